"""ERC datasets (MELD, EmoryNLP, IEMOCAP) and the DialogueLLM instruction template.

Each utterance becomes one instruction (Zhang et al. 2023, arXiv 2310.11374, Sec. 3): the previous `window`
utterances as context, an optional video description, the target utterance, the candidate labels."""
import argparse
import ast
import collections
import os
import re
from pathlib import Path

import numpy as np

import cli
import convert
import llama

DATASETS = ("meld", "emorynlp", "iemocap")
SPLITS = ("train", "dev", "test")
LABELS = {"meld": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
          "emorynlp": ["neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"],
          # 6-class ERC setting (COSMIC, DAG-ERC, InstructERC): excited is kept, NOT merged into happy.
          "iemocap": ["happy", "sad", "neutral", "angry", "excited", "frustrated"]}
IEMOCAP_CODES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"}
ID_TYPES = {"meld": (int, int), "emorynlp": (str, int), "iemocap": (str, str)}  # (dialogue_id, utterance_id)
EMORY_FILE = "emorynlp_{}_final.csv"  # the COSMIC-style CSV (7,551 / 954 / 984 utterances)
RESPONSE = "### Response:\n"
WINDOW = 2  # previous utterances in the context (the paper found 1-2 best)
MAX_LEN = 256  # prompt + answer tokens (the authors' scripts)

def fix_text(s: str) -> str:
    """Collapse whitespace runs (line breaks, tabs, double spaces) to one space; strip."""
    return " ".join(s.split())

def _dialogues(dataset: str, split: str, rows: list[tuple], sort: bool = True) -> list[list[dict]]:
    """(where, dialogue_id, utterance_id, speaker, text, label) rows -> dialogues; UserError: bad label, id twice."""
    first = {}
    groups = collections.defaultdict(list)
    for where, dialogue_id, utterance_id, speaker, text, label in rows:
        word = label.strip().lower()
        if word not in LABELS[dataset]:
            raise cli.UserError(f"{where}: unknown {dataset} label {label!r}; expected one of {LABELS[dataset]}")
        if (dialogue_id, utterance_id) in first:
            raise cli.UserError(f"{where}: dialogue {dialogue_id} utterance {utterance_id} again "
                                f"(first at {first[dialogue_id, utterance_id]})")
        first[dialogue_id, utterance_id] = where
        groups[dialogue_id].append(dict(dataset=dataset, split=split, dialogue_id=dialogue_id,
                                        utterance_id=utterance_id, speaker=fix_text(speaker), text=fix_text(text),
                                        label=word))
    return [sorted(g, key=lambda u: u["utterance_id"]) if sort else g for g in groups.values()]

def load_meld(path: Path, split: str) -> list[list[dict]]:
    """MELD's CSV (Poria et al. 2019) -> dialogues by Dialogue_ID, ordered by Utterance_ID ("Sr No." repeats)."""
    ints = ("Dialogue_ID", "Utterance_ID")
    rows = [(where, r[ints[0]], r[ints[1]], r["Speaker"], r["Utterance"], r["Emotion"])
            for where, r in cli.csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints)]
    return _dialogues("meld", split, rows)

def load_emorynlp(path: Path, split: str) -> list[list[dict]]:
    """EmoryNLP's COSMIC-style CSV -> dialogues, one per scene ("s01_e15_c01"), ordered by Utterance_ID."""
    ints = ("Scene_ID", "Utterance_ID", "Season", "Episode")
    rows = []
    for where, r in cli.csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints):
        try:  # a list literal, e.g. "['Joey Tribbiani', 'Ross Geller']"; literal_eval runs no code
            speakers = ast.literal_eval(r["Speaker"])
        except (ValueError, SyntaxError):
            speakers = None
        if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
            raise cli.UserError(f"{where}: Speaker {r['Speaker']!r} is not a list of strings")
        scene = f"s{r['Season']:02d}_e{r['Episode']:02d}_c{r['Scene_ID']:02d}"
        rows.append((where, scene, r["Utterance_ID"], ", ".join(speakers), r["Utterance"], r["Emotion"]))
    return _dialogues("emorynlp", split, rows)

_TRANSCRIPT = re.compile(r"(\S+) \[(\d+\.\d+)-(\d+\.\d+)\]: ?(.*)")
_SUMMARY = re.compile(r"\[(\d+\.\d+) - (\d+\.\d+)\]\s+(\S+)\s+(\w+)\s+\[\d+\.\d+, \d+\.\d+, \d+\.\d+\]")
_NOT_SUMMARY = re.compile(r"%|[A-Z]+-[A-Za-z0-9]+:")  # headers "%..." and per-annotator lines "C-E2:", "A-F1:"
_TURN = re.compile(r".+_([FM])\d{3}")  # Ses01F_impro01_F000; "..._FXX0"-style turns are never evaluated

def _iemocap_lines(path: Path, pattern: re.Pattern, skip: re.Pattern | None = None):
    """Yield ("file:line", match) per non-blank line of `path` that `skip` does not match; else UserError."""
    for n, line in enumerate(cli.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or (skip and skip.match(line)):
            continue
        m = pattern.fullmatch(line)
        if not m:
            raise cli.UserError(f"{path}:{n}: malformed line {line[:80]!r}; expected {pattern.pattern!r}")
        yield f"{path}:{n}", m

def load_iemocap(root: Path) -> tuple[dict[str, list[list[dict]]], collections.Counter]:
    """IEMOCAP (Busso et al. 2008) -> ({split: dialogues}, skipped counts): transcriptions/Ses*.txt labelled by
    EmoEvaluation/<same name>, speaker = gender. Test: Session 5; dev: the 1st, 11th, ... of Sessions 1-4 by name."""
    skipped = collections.Counter()
    splits = {split: [] for split in SPLITS}
    sessions_1_4 = 0
    for transcript in sorted(root.glob("Session[1-5]/dialog/transcriptions/Ses*.txt"), key=lambda p: p.stem):
        split = "test"
        if not transcript.stem.startswith("Ses05"):
            split = "dev" if sessions_1_4 % 10 == 0 else "train"
            sessions_1_4 += 1
        evaluation = transcript.parents[1] / "EmoEvaluation" / transcript.name
        codes = {m[3]: m[4] for _, m in _iemocap_lines(evaluation, _SUMMARY, _NOT_SUMMARY)}
        rows = []
        for where, m in _iemocap_lines(transcript, _TRANSCRIPT):
            code = codes.get(m[1])
            gender = _TURN.fullmatch(m[1])
            if code is None or not gender:
                skipped["no evaluation"] += 1
            elif code not in IEMOCAP_CODES:
                skipped[f"code {code}"] += 1
            else:
                rows.append((where, transcript.stem, m[1], gender[1], m[4], IEMOCAP_CODES[code]))
        splits[split] += _dialogues("iemocap", split, rows, sort=False)  # none if every turn was skipped
    return splits, skipped

def resolve_data_dir(data_dir=None) -> Path:
    """The data folder: the argument, else $DIALOGUELLM_DATA, else ./data."""
    return Path(data_dir or os.environ.get("DIALOGUELLM_DATA") or "data")

def _files(dataset: str, root: Path) -> list[Path]:
    """The files a dataset needs, one per split (IEMOCAP: its five session folders)."""
    if dataset == "meld":
        return [root / "meld" / name for name in convert.MELD_SHA256]  # train, dev, test
    if dataset == "iemocap":
        return [root / "iemocap/IEMOCAP_full_release" / f"Session{i}" for i in range(1, 6)]
    tops = [root / "emorynlp" / EMORY_FILE.format(split) for split in SPLITS]
    nested = [root / "emorynlp/meld_repo_csv" / top.name for top in tops]  # where MELD's repository puts them
    return [n if n.exists() and not top.exists() else top for top, n in zip(tops, nested)]

def load_split(dataset: str, split: str, data_dir=None) -> list[list[dict]]:
    """The dialogues of one split; UsageError for an unknown dataset or split. Missing MELD CSVs are downloaded."""
    cli.check_names("--data", [dataset], DATASETS)
    cli.check_names("--split", [split], SPLITS)
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise cli.UsageError(f"--data-dir {root}: not a folder; expected the folder holding {dataset}/")
    if dataset == "iemocap":
        missing = [str(p) for p in _files(dataset, root) if not p.is_dir()]
        if missing:
            raise cli.MissingError(f"IEMOCAP folders not found: {missing}")
        splits, skipped = load_iemocap(root / "iemocap/IEMOCAP_full_release")
        print(f"iemocap: skipped utterances {dict(skipped)}")
        return splits[split]
    path = _files(dataset, root)[SPLITS.index(split)]
    if dataset == "emorynlp":
        return load_emorynlp(path, split)
    if not path.exists():
        convert.fetch_meld(path)
    return load_meld(path, split)

def datasets_for(name: str, data_dir=None) -> list[str]:
    """The datasets of a --data value (UsageError for an unknown name); "all": those whose files exist."""
    if name != "all":
        names = name.split(",")
        bad = [n for n in names if n not in DATASETS]
        if bad:
            raise cli.UsageError(f"--data: unknown dataset(s) {bad}; expected {', '.join(DATASETS)}, a comma list "
                                 "of them, or all")
        return names
    root = resolve_data_dir(data_dir)
    found = [d for d in DATASETS if all(p.exists() for p in _files(d, root))]
    print(f"--data all: using {found}; not found in {root}: {[d for d in DATASETS if d not in found]}")
    if not found:
        raise cli.MissingError(f"--data all: no dataset found in {root}")
    return found

def _description(r, where: str) -> tuple[tuple, str]:
    """One descriptions record -> (key, description), or UserError naming `where` and the key at fault."""
    keys = ("dataset", "split", "dialogue_id", "utterance_id", "description")
    if not isinstance(r, dict):
        raise cli.UserError(f"{where}: a JSON {type(r).__name__}; expected an object with {', '.join(keys)}")
    missing = [k for k in keys if k not in r]
    if missing:
        raise cli.UserError(f"{where}: KeyError: missing key(s) {missing}; expected {', '.join(keys)}")
    if r["dataset"] not in DATASETS or r["split"] not in SPLITS:
        raise cli.UserError(f"{where}: key dataset/split is {r['dataset']!r}/{r['split']!r}; expected one of "
                            f"{', '.join(DATASETS)} / {', '.join(SPLITS)}")
    for key, kind in zip(("dialogue_id", "utterance_id"), ID_TYPES[r["dataset"]]):
        if type(r[key]) is not kind:  # "3" or 3.0 for 3 would silently match no utterance
            raise cli.UserError(f"{where}: key {key!r} is {r[key]!r}; {r['dataset']} ids are {kind.__name__}")
    if not isinstance(r["description"], str) or not r["description"].strip():
        raise cli.UserError(f"{where}: key 'description' is {r['description']!r}; expected a non-empty string")
    return (r["dataset"], r["split"], r["dialogue_id"], r["utterance_id"]), r["description"]

def load_descriptions(path) -> dict[tuple, str]:
    """JSONL records (vision.py writes them) -> {(dataset, split, dialogue_id, utterance_id): description}.
    MissingError, or UserError naming file:line for a bad byte, line, record (_description) or a repeated key."""
    out = {}
    for where, record in cli.jsonl_records(path):
        key, description = _description(record, where)
        if key in out:
            raise cli.UserError(f"{where}: a second description of {key}; expected one per utterance")
        out[key] = description
    return out

def make_prompt(context: list[dict], target: dict, labels: list[str], description: str | None = None) -> str:
    """The instruction (Alpaca-style sections), ending with RESPONSE; the answer is the label word, then EOS."""
    parts = [f"Name the emotion of the Input utterance. Answer with one label only.\nLabels: {', '.join(labels)}\n"]
    if context:
        parts.append("### Context:\n" + "".join(f"{u['speaker']}: {u['text']}\n" for u in context))
    if description:
        parts.append(f"### Video:\n{description}\n")
    parts.append(f"### Input:\n{target['speaker']}: {target['text']}\n{RESPONSE}")
    return "".join(parts)

def build_examples(dialogues: list[list[dict]], window: int, descriptions: dict | None = None) -> list[dict]:
    """One example dict per utterance; its context: the `window` (>= 0) previous utterances."""
    if window < 0:
        raise cli.UserError(f"window (previous utterances in the context) must be >= 0, got {window}")
    out = []
    for dialogue in dialogues:
        for i, u in enumerate(dialogue):
            context = dialogue[max(0, i - window):i]
            desc = (descriptions or {}).get((u["dataset"], u["split"], u["dialogue_id"], u["utterance_id"]))
            labels = LABELS[u["dataset"]]
            out.append(dict(prompt=make_prompt(context, u, labels, desc), label=u["label"], labels=labels,
                            dataset=u["dataset"], split=u["split"], dialogue_id=u["dialogue_id"],
                            utterance_id=u["utterance_id"], has_description=desc is not None,
                            context=context, target=u, description=desc))
    return out

def label_token_ids(tok, labels: list[str]) -> dict[str, list[int]]:
    """Each label's token ids after the prompt: encode(RESPONSE + label) minus encode(RESPONSE) (SentencePiece
    gives "neutral" alone as "▁neutral", after "\\n" as "neut", "ral"); UserError if the prefix tokens change."""
    prefix = tok.encode(RESPONSE)
    out = {}
    for label in labels:
        ids = tok.encode(RESPONSE + label)
        if ids[:len(prefix)] != prefix or len(ids) == len(prefix):
            raise cli.UserError(f"label {label!r}: encoding {RESPONSE!r} + label does not extend its encoding")
        out[label] = ids[len(prefix):]
    return out

def encode_example(tok, example: dict, max_len: int) -> tuple[list[int], int]:
    """(BOS + prompt + label + EOS token ids, n_answer: the last ids, where the loss goes), len <= max_len: context
    utterances go oldest first until the prompt fits beside the longest label of the set (not the gold one, so
    the prompt, in training as in evaluation, never depends on the answer); UserError if it does not fit even
    without context."""
    ids = label_token_ids(tok, example["labels"])
    answer = ids[example["label"]] + [tok.eos_id]
    room = 1 + max(len(label_ids) for label_ids in ids.values())  # the longest answer, EOS included
    context = example["context"]
    for dropped in range(len(context) + 1):  # the `dropped` oldest context utterances go
        prompt = make_prompt(context[dropped:], example["target"], example["labels"], example["description"])
        prompt_ids = tok.encode(prompt, bos=True)
        if len(prompt_ids) + room <= max_len:
            return prompt_ids + answer, len(answer)
    where = f"{example['dataset']} dialogue {example['dialogue_id']} utterance {example['utterance_id']}"
    raise cli.UserError(f"{where}: {len(prompt_ids)} prompt + {room} answer tokens (the longest label) without "
                        f"context > max_len {max_len}")

def check_conversation(c, where: str, default_id) -> dict:
    """A conversation to label, checked: {"id": a string or an integer of at most 200 characters (default:
    default_id), "utterances": a non-empty list of {"speaker": str, "text": str, "description": str (optional)}},
    texts valid Unicode. UserError naming `where` and the key. "where": where each utterance was read."""
    if not isinstance(c, dict) or not isinstance(c.get("utterances"), list) or not c["utterances"]:
        raise cli.UserError(f"{where}: expected an object with a non-empty list 'utterances', got {c!r:.60}")
    cid = c.get("id", default_id)
    if type(cid) not in (str, int) or len(str(cid)) > 200:  # not NaN, 1e400, true or a nested value
        raise cli.UserError(f"{where}: key 'id' is {cid!r:.60}; expected a string or an integer, at most 200 "
                            "characters")
    _check_unicode(cid, f"{where}: key 'id'")
    for i, u in enumerate(c["utterances"]):
        if not isinstance(u, dict):
            raise cli.UserError(f"{where}: utterances[{i}] is {u!r:.60}; expected an object")
        for key in ("speaker", "text", "description"):
            if not isinstance(u.get(key), str) and not (key == "description" and u.get(key) is None):
                got = f"is {u[key]!r:.60}" if key in u else "is missing"
                raise cli.UserError(f"{where}: utterances[{i}] key {key!r} {got}; expected a string")
            _check_unicode(u.get(key), f"{where}: utterances[{i}] key {key!r}")
    wheres = [f"{where}: utterances[{i}]" for i in range(len(c["utterances"]))]
    return dict(id=cid, utterances=c["utterances"], where=wheres)

def _check_unicode(value, where: str) -> None:
    """UserError for a string holding a lone surrogate (JSON "\\ud800"), which no tokenizer can encode."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise cli.UserError(f"{where} holds a lone surrogate {value[e.start]!r}; expected valid Unicode") from None

def check_fits(tok, conversations: list[dict], labels: list[str], max_len: int) -> None:
    """UserError naming where an utterance was read and its key when its speaker, or its description, leaves no
    token of max_len for the utterance (with the longest label): said before the model loads."""
    ids = label_token_ids(tok, labels)
    longest = max(labels, key=lambda label: len(ids[label]))
    fitted = set()
    for c in conversations:
        for u, where in zip(c["utterances"], c["where"]):
            for key in ("speaker", "description"):
                parts = (fix_text(u["speaker"]), u.get("description") if key == "description" else None)
                if (key == "description" and not parts[1]) or parts in fitted:
                    continue
                example = dict(label=longest, labels=labels, context=[], description=parts[1], dataset="input",
                               dialogue_id=c["id"], utterance_id=0, target=dict(speaker=parts[0], text=""))
                try:
                    encode_example(tok, example, max_len)
                except cli.UserError:
                    raise cli.UserError(f"{where} key {key!r} ({len(u[key])} characters) leaves no room for the "
                                        f"utterance within the checkpoint's max_len {max_len}; shorten it") from None
                fitted.add(parts)

def read_conversations(path, fmt: str) -> list[dict]:
    """Conversations from JSONL (fmt "jsonl": one per line, as check_conversation) or a CSV with MELD's
    columns Dialogue_ID, Utterance_ID, Speaker, Utterance (Utterance_ID order). UserError naming file:line."""
    if fmt == "csv":
        ints = ("Dialogue_ID", "Utterance_ID")
        dialogues = {}
        for where, r in cli.csv_rows(path, ["Speaker", "Utterance", *ints], ints, multiline=True):
            dialogue = dialogues.setdefault(r[ints[0]], {})
            if r[ints[1]] in dialogue:
                raise cli.UserError(f"{where}: Dialogue_ID {r[ints[0]]} Utterance_ID {r[ints[1]]} again")
            dialogue[r[ints[1]]] = (dict(speaker=r["Speaker"], text=r["Utterance"]), f"{where}:")
        return [dict(id=d, utterances=[u[k][0] for k in sorted(u)], where=[u[k][1] for k in sorted(u)])
                for d, u in dialogues.items()]
    conversations = []
    for where, record in cli.jsonl_records(path):
        conversations.append(check_conversation(record, where, len(conversations)))
    if not conversations:
        raise cli.UserError(f"{cli.shown(path)}: no conversation; expected one JSON object per line")
    return conversations

def cut_to_fit(tok, example: dict, max_len: int) -> bool:
    """Cut the target text from its start, a tenth at a time, until encode_example fits it; True if cut."""
    given = example["target"]["text"]
    while True:
        try:
            encode_example(tok, dict(example, context=[]), max_len)
            return example["target"]["text"] != given
        except cli.UserError:
            text = example["target"]["text"]
            if not text:
                raise  # the prompt does not fit even without the utterance's text
            example["target"] = dict(example["target"], text=text[len(text) // 10 + 1:])

def _stats(args) -> None:
    """Per split: dialogues, utterances, label counts, prompt+answer length percentiles in tokens."""
    names = datasets_for(args.data, args.data_dir)
    descriptions = load_descriptions(args.descriptions) if args.descriptions else None
    tok = llama.load_tokenizer(convert.model_dir(args.model))
    for dataset in names:
        answers = {label: len(ids) + 1 for label, ids in label_token_ids(tok, LABELS[dataset]).items()}  # + EOS
        for split in SPLITS:
            dialogues = load_split(dataset, split, args.data_dir)  # a missing file: MissingError, exit 1
            examples = build_examples(dialogues, args.window, descriptions)
            lengths = [len(tok.encode(e["prompt"], bos=True)) + answers[e["label"]] for e in examples]
            p50, p90, p99, top = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
            labels = collections.Counter(e["label"] for e in examples).most_common()
            print(f"{dataset} {split}: {len(dialogues)} dialogues, {len(examples)} utterances, "
                  f"{sum(e['has_description'] for e in examples)} with description\n  labels {dict(labels)}")
            print(f"  tokens (window {args.window}) p50 {p50} p90 {p90} p99 {p99} max {top}")

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="meld", help="meld, emorynlp, iemocap, a comma list of them, or all")
    ap.add_argument("--data-dir", default=None, help="default: $DIALOGUELLM_DATA, else ./data")
    ap.add_argument("--stats", action="store_true", help="print split sizes, label counts and prompt lengths")
    ap.add_argument("--model", default="default", help="tokenizer for --stats: 'default' or a model folder")
    ap.add_argument("--window", type=cli.natural_int, default=WINDOW, help="previous utterances in the context")
    ap.add_argument("--descriptions", default=None, help="descriptions JSONL (for --stats)")
    ap.add_argument("--convert-descriptions", nargs=2, metavar=("SRC", "OUT"),
                    help="convert Meld-Captioning sorted_annotations.json to descriptions JSONL")
    args = ap.parse_args(argv)
    if args.convert_descriptions:
        src, out = args.convert_descriptions
        cli.check_writable(Path(out).parent, "--convert-descriptions OUT")
        print(f"wrote {convert.convert_meld_annotations(src, out)} descriptions to {out}")
    elif args.stats:
        _stats(args)
    else:
        ap.error("nothing to do: give --stats or --convert-descriptions SRC OUT")
    return 0

if __name__ == "__main__":
    cli.run(main)
