"""ERC datasets (MELD, EmoryNLP, IEMOCAP) and the DialogueLLM instruction template.

A dialogue is a list of utterance dicts {dataset, split, dialogue_id, utterance_id, speaker, text, label}, in order.
An example is one utterance turned into an instruction (Zhang et al. 2023, arXiv 2310.11374, Sec. 3): the previous
`window` utterances as context, an optional video description, the target utterance, the candidate labels.
A bad data file is a cli.UserError naming file:line; a missing one is a cli.MissingError.
"""
import argparse
import ast
import collections
import csv
import hashlib
import io
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np

import cli
import convert
import llama

DATASETS = ("meld", "emorynlp", "iemocap")
SPLITS = ("train", "dev", "test")
LABELS = {
    "meld": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
    "emorynlp": ["neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"],
    # 6-class ERC setting (COSMIC, DAG-ERC, InstructERC): excited is kept, NOT merged into happy.
    "iemocap": ["happy", "sad", "neutral", "angry", "excited", "frustrated"],
}
IEMOCAP_CODES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"}
ID_TYPES = {"meld": (int, int), "emorynlp": (str, int), "iemocap": (str, str)}  # (dialogue_id, utterance_id)
EMORY_FILE = "emorynlp_{}_final.csv"  # the COSMIC-style CSV (7,551 / 954 / 984 utterances)
MELD_URL = "https://raw.githubusercontent.com/declare-lab/MELD/2d2011b409d3ca2d7e94460cd007d434b1d0a102/data/MELD/"
MELD_SHA256 = {  # from shared/data/meld/SOURCE.md
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
}
RESPONSE = "### Response:\n"
WINDOW = 2  # previous utterances in the context (the paper found 1-2 best)
MAX_LEN = 256  # prompt + answer tokens (the authors' scripts)

# ---------------------------------------------------------------- text repair

# Windows-1252 bytes: raw bytes that are not UTF-8 (kept as surrogates \udc80-\udcff by "surrogateescape") and C1
# control characters U+0080-U+009F (the bytes read as Latin-1) both become their cp1252 character, e.g. 0x92 -> ’.
# The 5 bytes cp1252 leaves undefined (0x81 0x8d 0x8f 0x90 0x9d) keep their Latin-1 character.
_CP1252 = {b: bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(0x80, 0x100)}
_REPAIR = {0xDC00 + b: c for b, c in _CP1252.items()} | {b: c for b, c in _CP1252.items() if b < 0xA0}
# Mojibake: UTF-8 bytes read as cp1252 or Latin-1 ("â€™", "Â\x92"): a lead byte 0xc2-0xf4, then 1-3 of 0x80-0xbf.
_TO_BYTE = {chr(b): b for b in range(0x80, 0x100)} | {c: b for b, c in _CP1252.items()}
_CONTINUATION = "".join(c for c, b in _TO_BYTE.items() if b < 0xC0)  # every character standing for 0x80-0xbf
_MOJIBAKE = re.compile(f"[\xc2-\xf4][{re.escape(_CONTINUATION)}]{{1,3}}")


def _unmojibake(m: re.Match) -> str:
    """One mojibake run -> the character it encodes; unchanged unless its bytes are valid UTF-8."""
    try:
        return bytes(_TO_BYTE[c] for c in m[0]).decode("utf-8")
    except UnicodeDecodeError:
        return m[0]


def fix_text(s: str) -> str:
    """Repair UTF-8 mojibake and Windows-1252 bytes, collapse whitespace runs to one space, strip."""
    if not s.isascii():
        s = _MOJIBAKE.sub(_unmojibake, s)
        s = s.translate(_REPAIR)
    return re.sub(r"\s+", " ", s).strip()


def _read(path, strict: bool = False) -> str:
    """File text; bytes that are not UTF-8 become surrogates for fix_text, or if `strict` a UserError (line)."""
    path = Path(path)
    if not path.is_file():
        raise cli.MissingError(f"{path}: not found")
    blob = path.read_bytes()
    try:
        text = blob.decode("utf-8", "strict" if strict else "surrogateescape")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise cli.UserError(f"{path}:{line}: byte {blob[e.start]:#04x} is not UTF-8") from None
    return text.removeprefix("\ufeff")

# ---------------------------------------------------------------- per-dataset loaders


def _csv_rows(path: Path, columns: list[str], ints: tuple[str, ...]):
    """Yield ("file:line", row) per record of a MELD / EmoryNLP CSV (the line where it starts), `ints` converted.
    UserError there for a missing column, no rows, a short row, a non-integer in `ints`, or a field holding a line
    break: no utterance of these benchmarks has one, so it is an unclosed quote that swallowed the next rows."""
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise cli.UserError(f"{path}:1: missing column(s) {missing}; header is {header}")
    first = reader.line_num + 1
    start = first
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if any("\n" in v or "\r" in v for v in row.values() if isinstance(v, str)):
            raise cli.UserError(f"{where}: a field holds a line break (an unclosed quote?) up to line {start - 1}")
        if any(row[c] is None for c in columns):
            raise cli.UserError(f"{where}: row has fewer than {len(header)} fields")
        for c in ints:
            if not row[c].strip().isdigit():
                raise cli.UserError(f"{where}: column {c} is {row[c]!r}; expected an integer")
            row[c] = int(row[c])
        yield where, row
    if start == first:
        raise cli.UserError(f"{path}: a header and no rows")


def _utt(where, dataset, split, dialogue_id, utterance_id, speaker, text, label) -> tuple[str, dict]:
    """("file:line", utterance dict), text repaired, label lower-cased; UserError there for an unknown label."""
    word = label.strip().lower()
    if word not in LABELS[dataset]:
        raise cli.UserError(f"{where}: unknown {dataset} label {label!r}; expected one of {LABELS[dataset]}")
    return where, dict(dataset=dataset, split=split, dialogue_id=dialogue_id, utterance_id=utterance_id,
                       speaker=fix_text(speaker), text=fix_text(text), label=word)


def _dialogues(rows: list[tuple[str, dict]], sort: bool = True) -> list[list[dict]]:
    """("file:line", utterance) pairs -> dialogues by dialogue_id (first-seen order), each sorted by utterance_id
    if `sort`. UserError naming both lines when a (dialogue_id, utterance_id) pair repeats."""
    first = {}
    groups = collections.defaultdict(list)
    for where, u in rows:
        key = (u["dialogue_id"], u["utterance_id"])
        if key in first:
            raise cli.UserError(f"{where}: dialogue {key[0]} utterance {key[1]} again (first at {first[key]})")
        first[key] = where
        groups[key[0]].append(u)
    return [sorted(g, key=lambda u: u["utterance_id"]) if sort else g for g in groups.values()]


def fetch_meld(path: Path) -> None:
    """Download one MELD CSV from the pinned GitHub commit to `path`, verify its sha256, write it atomically.
    UserError on a checksum mismatch, MissingError when offline; nothing is written then."""
    print(f"{path} is missing: downloading it from {MELD_URL + path.name}")
    try:
        with urllib.request.urlopen(MELD_URL + path.name, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise cli.MissingError(f"{path}: not found, and the download failed ({e}); put the MELD CSVs there, or "
                               "point --data-dir / $DIALOGUELLM_DATA at a folder holding meld/") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != MELD_SHA256[path.name]:
        raise cli.UserError(f"{MELD_URL + path.name}: sha256 {got}, expected {MELD_SHA256[path.name]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(path, blob)
    print(f"downloaded {path.name} ({len(blob)} bytes, sha256 ok) to {path}")


def load_meld(path: Path, split: str) -> list[list[dict]]:
    """MELD official CSV (Poria et al. 2019) -> dialogues by Dialogue_ID, ordered by Utterance_ID (ids have gaps;
    "Sr No." repeats in train, so it is not used)."""
    ints = ("Dialogue_ID", "Utterance_ID")
    rows = []
    for where, r in _csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints):
        rows.append(_utt(where, "meld", split, r[ints[0]], r[ints[1]], r["Speaker"], r["Utterance"], r["Emotion"]))
    return _dialogues(rows)


def load_emorynlp(path: Path, split: str) -> list[list[dict]]:
    """EmoryNLP CSV used by COSMIC-style work (the subset with timestamps) -> dialogues, one per scene
    ("s01_e15_c01"), ordered by Utterance_ID. Speaker is a list literal, parsed with ast.literal_eval only."""
    ints = ("Scene_ID", "Utterance_ID", "Season", "Episode")
    rows = []
    for where, r in _csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints):
        try:
            speakers = ast.literal_eval(r["Speaker"])
        except (ValueError, SyntaxError):
            speakers = None
        if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
            raise cli.UserError(f"{where}: Speaker {r['Speaker']!r} is not a list of strings")
        scene = f"s{r['Season']:02d}_e{r['Episode']:02d}_c{r['Scene_ID']:02d}"
        speaker = ", ".join(speakers)
        rows.append(_utt(where, "emorynlp", split, scene, r["Utterance_ID"], speaker, r["Utterance"], r["Emotion"]))
    return _dialogues(rows)


_TRANSCRIPT = re.compile(r"(\S+) \[(\d+\.\d+)-(\d+\.\d+)\]: ?(.*)")
_SUMMARY = re.compile(r"\[(\d+\.\d+) - (\d+\.\d+)\]\s+(\S+)\s+(\w+)\s+\[\d+\.\d+, \d+\.\d+, \d+\.\d+\]")
_NOT_SUMMARY = re.compile(r"%|[A-Z]+-[A-Za-z0-9]+:")  # headers "%..." and per-annotator lines "C-E2:", "A-F1:"
_TURN = re.compile(r".+_([FM])\d{3}")  # Ses01F_impro01_F000; "..._FXX0"-style turns are never evaluated


def _iemocap_lines(path: Path, pattern: re.Pattern, skip: re.Pattern | None = None):
    """Yield ("file:line", match) per non-blank line of `path` that `skip` does not match; else UserError."""
    for n, line in enumerate(_read(path).splitlines(), 1):
        line = line.strip()
        if not line or (skip and skip.match(line)):
            continue
        m = pattern.fullmatch(line)
        if not m:
            raise cli.UserError(f"{path}:{n}: malformed line {line[:80]!r}; expected {pattern.pattern!r}")
        yield f"{path}:{n}", m


def load_iemocap(root: Path) -> tuple[dict[str, list[list[dict]]], collections.Counter]:
    """IEMOCAP official release (Busso et al. 2008) -> ({split: dialogues}, counts of skipped utterances).
    A dialogue: the turns of Session*/dialog/transcriptions/Ses*.txt in order, labelled by the summary lines of
    dialog/EmoEvaluation/<same>.txt ("[start - end]<TAB>turn<TAB>code<TAB>[V, A, D]"), speaker = gender "F"/"M".
    Other codes than the 6 classes, and turns without an evaluation, are skipped and counted. Split: Session 5 =
    test; of the Session 1-4 dialogues sorted by name, index % 10 == 0 = dev, the rest = train."""
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
                label = IEMOCAP_CODES[code]
                rows.append(_utt(where, "iemocap", split, transcript.stem, m[1], gender[1], m[4], label))
        splits[split] += _dialogues(rows, sort=False)  # none if every turn was skipped
    return splits, skipped

# ---------------------------------------------------------------- datasets


def resolve_data_dir(data_dir=None) -> Path:
    """The data folder: the argument, else $DIALOGUELLM_DATA, else ./data."""
    return Path(data_dir or os.environ.get("DIALOGUELLM_DATA") or "data")


def _files(dataset: str, root: Path) -> list[Path]:
    """The files a dataset needs, one per split (IEMOCAP: its five session folders). EmoryNLP CSVs: in
    data_dir/emorynlp/, else in data_dir/emorynlp/meld_repo_csv/."""
    if dataset == "meld":
        return [root / "meld" / name for name in MELD_SHA256]
    if dataset == "iemocap":
        return [root / "iemocap/IEMOCAP_full_release" / f"Session{i}" for i in range(1, 6)]
    paths = []
    for split in SPLITS:
        top = root / "emorynlp" / EMORY_FILE.format(split)
        nested = root / "emorynlp/meld_repo_csv" / top.name
        paths.append(nested if nested.exists() and not top.exists() else top)
    return paths


def load_split(dataset: str, split: str, data_dir=None) -> list[list[dict]]:
    """Dialogues of one split: list of dialogues, each a list of utterance dicts in order. UsageError for a dataset
    not in DATASETS or a split not in SPLITS; missing MELD CSVs are downloaded (fetch_meld)."""
    cli.check_names("--data", [dataset], DATASETS)
    cli.check_names("--split", [split], SPLITS)
    root = resolve_data_dir(data_dir)
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
        fetch_meld(path)
    return load_meld(path, split)


def datasets_for(name: str, data_dir=None) -> list[str]:
    """Dataset names for a --data value: a name or comma list of DATASETS (else UsageError), or "all" = those whose
    files exist; the ones not found are printed, none found -> MissingError."""
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

# ---------------------------------------------------------------- video descriptions


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
    """JSONL {"dataset", "split", "dialogue_id", "utterance_id", "description"} per line (vision.py writes it) ->
    {(dataset, split, dialogue_id, utterance_id): description}. MissingError, or UserError naming file:line for a
    byte that is not UTF-8, a line that is not JSON, a bad record (not an object, a missing key, an unknown dataset
    or split, ids not of the type the dataset's loader gives (ID_TYPES), an empty description), a repeated key."""
    out = {}
    for n, line in enumerate(_read(path, strict=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise cli.UserError(f"{path}:{n}: JSONDecodeError: {e}; expected one JSON object per line") from None
        key, description = _description(record, f"{path}:{n}")
        if key in out:
            raise cli.UserError(f"{path}:{n}: a second description of {key}; expected one per utterance")
        out[key] = description
    return out


def convert_meld_annotations(src_json, out_jsonl) -> int:
    """EmotionConflict/Meld-Captioning sorted_annotations.json (MELD test clips "diaX_uttY.mp4") -> descriptions
    JSONL, written atomically; returns the record count. MissingError, or UserError naming the file (and line
    or record) for bytes that are not UTF-8, text that is not a JSON list, a record without id or description."""
    try:
        records = json.loads(_read(src_json, strict=True))
    except json.JSONDecodeError as e:
        raise cli.UserError(f"{src_json}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise cli.UserError(f"{src_json}: a JSON {type(records).__name__}; expected a list of annotation records")
    lines = []
    for i, rec in enumerate(records):
        fields = rec if isinstance(rec, dict) else {}
        m = re.fullmatch(r"dia(\d+)_utt(\d+)\.mp4", str(fields.get("video_id")))
        # Only the objective visual description: fine-grained_summary was written by a model GIVEN THE GOLD LABEL,
        # and coarse-grained_summary mixes in the audio model's emotion guesses; both would leak the answer.
        raw = fields.get("visual_objective_description")
        description = fix_text(raw) if isinstance(raw, str) else ""
        if not m or not description:
            raise cli.UserError(f"{src_json}: record {i}: need video_id 'diaX_uttY.mp4' and a "
                                "visual_objective_description")
        row = dict(dataset="meld", split="test", dialogue_id=int(m[1]), utterance_id=int(m[2]),
                   description=description)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    cli.atomic_write(out_jsonl, "".join(lines))
    return len(lines)

# ---------------------------------------------------------------- instructions


def make_prompt(context: list[dict], target: dict, labels: list[str], description: str | None = None) -> str:
    """The one instruction template (Alpaca-style sections, compact). context/target: dicts with speaker, text.
    Ends with RESPONSE; the answer is the label word followed by EOS."""
    parts = [f"Name the emotion of the Input utterance. Answer with one label only.\nLabels: {', '.join(labels)}\n"]
    if context:
        parts.append("### Context:\n" + "".join(f"{u['speaker']}: {u['text']}\n" for u in context))
    if description:
        parts.append(f"### Video:\n{description}\n")
    parts.append(f"### Input:\n{target['speaker']}: {target['text']}\n{RESPONSE}")
    return "".join(parts)


def build_examples(dialogues: list[list[dict]], window: int, descriptions: dict | None = None) -> list[dict]:
    """One example per utterance: {prompt, label, labels, dataset, split, dialogue_id, utterance_id,
    has_description, context, target, description}; context: the `window` (>= 0) previous utterances."""
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
    """Token ids of each label as it appears after the prompt: encode(RESPONSE + label) minus encode(RESPONSE).
    (SentencePiece gives "neutral" alone as "▁neutral" but after "\\n" as "neut", "ral".) UserError if the prefix
    tokens change when the label is appended: a tokenizer this template cannot score with."""
    prefix = tok.encode(RESPONSE)
    out = {}
    for label in labels:
        ids = tok.encode(RESPONSE + label)
        if ids[:len(prefix)] != prefix or len(ids) == len(prefix):
            raise cli.UserError(f"label {label!r}: encoding {RESPONSE!r} + label does not extend its encoding")
        out[label] = ids[len(prefix):]
    return out


def encode_example(tok, example: dict, max_len: int) -> tuple[list[int], int]:
    """BOS + prompt + label ids + EOS as token ids (list[int], len <= max_len), and n_answer = label ids + 1 (the
    last n_answer ids; the loss goes only there). Context utterances are dropped oldest first until it fits;
    UserError (naming dialogue/utterance and lengths) if it does not fit even without context."""
    label_ids = label_token_ids(tok, [example["label"]])[example["label"]]
    answer = label_ids + [tok.eos_id]
    context = example["context"]
    for dropped in range(len(context) + 1):  # the `dropped` oldest context utterances go
        prompt = make_prompt(context[dropped:], example["target"], example["labels"], example["description"])
        ids = tok.encode(prompt, bos=True)
        if len(ids) + len(answer) <= max_len:
            return ids + answer, len(answer)
    where = f"{example['dataset']} dialogue {example['dialogue_id']} utterance {example['utterance_id']}"
    sizes = f"{len(ids)} prompt + {len(answer)} answer tokens"
    raise cli.UserError(f"{where}: {sizes} without context > max_len {max_len}")

# ---------------------------------------------------------------- CLI


def _stats(args) -> None:
    """Per split: dialogues, utterances, label counts, prompt+answer length percentiles in tokens."""
    names = datasets_for(args.data, args.data_dir)
    descriptions = load_descriptions(args.descriptions) if args.descriptions else None
    tok = llama.load_tokenizer(convert.model_dir(args.model))
    for dataset in names:
        label_ids = label_token_ids(tok, LABELS[dataset])
        answers = {label: len(ids) + 1 for label, ids in label_ids.items()}  # + EOS
        for split in SPLITS:
            try:
                dialogues = load_split(dataset, split, args.data_dir)
            except FileNotFoundError as e:
                print(f"{dataset} {split}: not found ({e})")
                continue
            examples = build_examples(dialogues, args.window, descriptions)
            lengths = [len(tok.encode(e["prompt"], bos=True)) + answers[e["label"]] for e in examples]
            p50, p90, p99, top = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
            labels = collections.Counter(e["label"] for e in examples)
            print(f"{dataset} {split}: {len(dialogues)} dialogues, {len(examples)} utterances, "
                  f"{sum(e['has_description'] for e in examples)} with description")
            print(f"  labels {dict(labels.most_common())}")
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
        print(f"wrote {convert_meld_annotations(src, out)} descriptions to {out}")
    elif args.stats:
        _stats(args)
    else:
        ap.error("nothing to do: give --stats or --convert-descriptions SRC OUT")
    return 0


if __name__ == "__main__":
    cli.run(main)
