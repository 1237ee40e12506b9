"""ERC datasets (MELD, EmoryNLP, IEMOCAP) and the DialogueLLM instruction template.

A dialogue is a list of utterance dicts {dataset, split, dialogue_id, utterance_id, speaker, text, label}, in order.
An example is one utterance turned into an instruction (Zhang et al. 2023, arXiv 2310.11374, Sec. 3): the previous
`window` utterances as context, an optional video description, the target utterance, the candidate labels.
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
import sys
import urllib.request
from pathlib import Path

LABELS = {
    "meld": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
    "emorynlp": ["neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"],
    # 6-class ERC setting (COSMIC, DAG-ERC, InstructERC): excited is kept, NOT merged into happy.
    "iemocap": ["happy", "sad", "neutral", "angry", "excited", "frustrated"],
}
LABELS["emorynlp-json"] = LABELS["emorynlp"]  # the official JSON release of the same annotation
IEMOCAP_CODES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"}
EMORY_FILES = {"csv": "emorynlp_{}_final.csv", "json": "emotion-detection-{}.json"}
EMORY_JSON_SPLIT = {"train": "trn", "dev": "dev", "test": "tst"}
MELD_URL = "https://raw.githubusercontent.com/declare-lab/MELD/2d2011b409d3ca2d7e94460cd007d434b1d0a102/data/MELD/"
MELD_SHA256 = {  # from shared/data/meld/SOURCE.md
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
}
SPLITS = ("train", "dev", "test")
RESPONSE = "### Response:\n"

# ---------------------------------------------------------------- text

# Windows-1252 bytes: raw bytes that are not UTF-8 (kept as surrogates \udc80-\udcff by "surrogateescape") and C1
# control characters U+0080-U+009F (the bytes read as Latin-1) both become their cp1252 character, e.g. 0x92 -> ’.
# The 5 bytes cp1252 leaves undefined (0x81 0x8d 0x8f 0x90 0x9d) keep their Latin-1 character.
_CP1252 = {b: bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(0x80, 0x100)}
_REPAIR = {0xDC00 + b: c for b, c in _CP1252.items()} | {b: c for b, c in _CP1252.items() if b < 0xA0}
# Mojibake: UTF-8 bytes read as cp1252 or Latin-1 ("â€™", "Â\x92"): a lead byte 0xc2-0xf4, then 1-3 of 0x80-0xbf.
_TO_BYTE = {chr(b): b for b in range(0x80, 0x100)} | {c: b for b, c in _CP1252.items()}
_MOJIBAKE = re.compile(f"[\xc2-\xf4][{re.escape(''.join(c for c, b in _TO_BYTE.items() if b < 0xC0))}]{{1,3}}")


def _unmojibake(m: re.Match) -> str:
    """One mojibake run -> the character it encodes; unchanged unless its bytes are valid UTF-8."""
    try:
        return bytes(_TO_BYTE[c] for c in m[0]).decode("utf-8")
    except UnicodeDecodeError:
        return m[0]


def fix_text(s: str) -> str:
    """Repair UTF-8 mojibake and Windows-1252 bytes, collapse whitespace runs to one space, strip."""
    if not s.isascii():
        s = _MOJIBAKE.sub(_unmojibake, s).translate(_REPAIR)
    return re.sub(r"\s+", " ", s).strip()


def _read(path: Path) -> str:
    """File text; bytes that are not UTF-8 survive as surrogates for fix_text."""
    return path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def _csv_rows(path: Path, columns: list[str], ints: tuple[str, ...] = ()):
    """Yield (line number, row dict) of a CSV file, checking that `columns` exist, no row is short, and the
    `ints` columns hold integers (converted in the row)."""
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing}; header is {reader.fieldnames}")
    for row in reader:
        if any(row[c] is None for c in columns):
            raise ValueError(f"{path}:{reader.line_num}: row has fewer than {len(reader.fieldnames)} fields")
        for c in ints:
            if not row[c].strip().isdigit():
                raise ValueError(f"{path}:{reader.line_num}: column {c} is {row[c]!r}; expected an integer")
            row[c] = int(row[c])
        yield reader.line_num, row


def _label(dataset: str, raw: str, where: str) -> str:
    """The lower-case label word, or ValueError naming `where` (file:line)."""
    if raw.strip().lower() not in LABELS[dataset]:
        raise ValueError(f"{where}: unknown {dataset} label {raw!r}; expected one of {LABELS[dataset]}")
    return raw.strip().lower()


def _dialogues(utts: list[dict]) -> list[list[dict]]:
    """Group utterance dicts by dialogue_id (first-seen order) and sort each by utterance_id."""
    groups = collections.defaultdict(list)
    for u in utts:
        groups[u["dialogue_id"]].append(u)
    return [sorted(g, key=lambda u: u["utterance_id"]) for g in groups.values()]


def _utt(dataset, split, dialogue_id, utterance_id, speaker, text, label) -> dict:
    return dict(dataset=dataset, split=split, dialogue_id=dialogue_id, utterance_id=utterance_id,
                speaker=fix_text(speaker), text=fix_text(text), label=label)

# ---------------------------------------------------------------- MELD


def fetch_meld(path: Path) -> None:
    """Download one MELD CSV from the pinned GitHub commit to `path`, verify its sha256, write atomically.

    Raises ValueError on a checksum mismatch and ConnectionError when offline (nothing is written)."""
    print(f"{path} is missing: downloading it from {MELD_URL + path.name}")
    try:
        with urllib.request.urlopen(MELD_URL + path.name, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise ConnectionError(f"could not download {path.name} ({e}); put the MELD CSVs in {path.parent}, "
                              "or point --data-dir / $DIALOGUELLM_DATA at a folder holding meld/") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != MELD_SHA256[path.name]:
        raise ValueError(f"{MELD_URL + path.name}: sha256 {got}, expected {MELD_SHA256[path.name]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    print(f"downloaded {path.name} ({len(blob)} bytes, sha256 ok) to {path}")


def load_meld(path: Path, split: str) -> list[list[dict]]:
    """MELD official CSV (Poria et al. 2019) -> dialogues; grouped by Dialogue_ID, ordered by Utterance_ID
    (ids have gaps; "Sr No." is not unique in train, so it is not used). Raises ValueError naming file:line."""
    cols = ["Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"]
    return _dialogues([_utt("meld", split, r["Dialogue_ID"], r["Utterance_ID"], r["Speaker"],
                            r["Utterance"], _label("meld", r["Emotion"], f"{path}:{line}"))
                       for line, r in _csv_rows(path, cols, ints=("Dialogue_ID", "Utterance_ID"))])

# ---------------------------------------------------------------- EmoryNLP


def load_emorynlp_csv(path: Path, split: str) -> list[list[dict]]:
    """EmoryNLP CSV used by COSMIC-style work (the subset with timestamps) -> dialogues, one per scene
    ("s01_e15_c01"), ordered by Utterance_ID. Speaker is a list literal, parsed with ast.literal_eval only."""
    utts = []
    cols = ["Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode"]
    for line, r in _csv_rows(path, cols, ints=("Scene_ID", "Utterance_ID", "Season", "Episode")):
        try:
            speakers = ast.literal_eval(r["Speaker"])
        except (ValueError, SyntaxError):
            speakers = None
        if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
            raise ValueError(f"{path}:{line}: Speaker {r['Speaker']!r} is not a list of strings")
        scene = f"s{r['Season']:02d}_e{r['Episode']:02d}_c{r['Scene_ID']:02d}"
        utts.append(_utt("emorynlp", split, scene, r["Utterance_ID"], ", ".join(speakers), r["Utterance"],
                         _label("emorynlp", r["Emotion"], f"{path}:{line}")))
    return _dialogues(utts)


def load_emorynlp_json(path: Path, split: str) -> list[list[dict]]:
    """EmoryNLP official JSON (Zahiri & Choi 2018: episodes > scenes > utterances) -> dialogues, one per scene.
    Raises ValueError naming the file and the missing key or bad label."""
    utts = []
    try:
        for episode in json.loads(_read(path))["episodes"]:
            for scene in episode["scenes"]:
                for u in scene["utterances"]:
                    label = _label("emorynlp", u["emotion"], f"{path}: utterance {u.get('utterance_id')}")
                    number = int(u["utterance_id"].rsplit("_u", 1)[1])  # "s01_e15_c01_u001" -> 1
                    utts.append(_utt("emorynlp-json", split, scene["scene_id"], number, ", ".join(u["speakers"]),
                                     u["transcript"], label))
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e} (expected episodes > scenes > utterances)") from None
    return _dialogues(utts)

# ---------------------------------------------------------------- IEMOCAP

_TRANSCRIPT = re.compile(r"(\S+) \[(\d+\.\d+)-(\d+\.\d+)\]: ?(.*)")
_SUMMARY = re.compile(r"\[(\d+\.\d+) - (\d+\.\d+)\]\s+(\S+)\s+(\w+)\s+\[\d+\.\d+, \d+\.\d+, \d+\.\d+\]")
_TURN = re.compile(r".+_([FM])\d{3}")  # Ses01F_impro01_F000; "..._FXX0"-style turns are never evaluated


def _iemocap_lines(path: Path, pattern: re.Pattern, skip: re.Pattern | None = None):
    """Yield regex matches of the non-blank lines of `path`; a line matching neither pattern -> ValueError."""
    for n, line in enumerate(_read(path).splitlines(), 1):
        line = line.strip()
        if not line or (skip and skip.match(line)):
            continue
        m = pattern.fullmatch(line)
        if not m:
            raise ValueError(f"{path}:{n}: malformed line {line[:80]!r}; expected {pattern.pattern!r}")
        yield m


def load_iemocap(root: Path) -> tuple[dict[str, list[list[dict]]], collections.Counter]:
    """IEMOCAP official release (Busso et al. 2008) -> ({split: dialogues}, counts of skipped utterances).

    Reads Session{1..5}/dialog/transcriptions/Ses*.txt and the summary lines of dialog/EmoEvaluation/<same>.txt
    ("[start - end]<TAB>turn<TAB>code<TAB>[V, A, D]"; headers "%..." and per-annotator lines "C-E2:", "A-F1:" skipped).
    6 classes (hap, sad, neu, ang, exc, fru; excited NOT merged into happy); other codes (xxx, sur, fea, dis, oth)
    and transcript turns without an evaluation are skipped and counted. Speaker = the turn's gender letter "F"/"M".
    Split: Session 5 = test; of the Session 1-4 dialogues sorted by name, index % 10 == 0 = dev, the rest = train.
    Raises ValueError naming file:line for a malformed line, FileNotFoundError for a missing evaluation file.
    """
    skipped, dialogues = collections.Counter(), {}
    for trans in sorted(root.glob("Session[1-5]/dialog/transcriptions/Ses*.txt")):
        codes = {m[3]: m[4] for m in _iemocap_lines(trans.parents[1] / "EmoEvaluation" / trans.name, _SUMMARY,
                                                     re.compile(r"%|[A-Z]+-[A-Za-z0-9]+:"))}
        utts = []
        for m in _iemocap_lines(trans, _TRANSCRIPT):
            turn, text, code = m[1], m[4], codes.get(m[1])
            gender = _TURN.fullmatch(turn)
            if code is None or not gender:
                skipped["no evaluation"] += 1
            elif code not in IEMOCAP_CODES:
                skipped[f"code {code}"] += 1
            else:
                utts.append(_utt("iemocap", None, trans.stem, turn, gender[1], text, IEMOCAP_CODES[code]))
        dialogues[trans.stem] = utts
    splits = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(d for d in dialogues if not d.startswith("Ses05"))):
        splits["dev" if i % 10 == 0 else "train"].append(name)
    splits["test"] = sorted(d for d in dialogues if d.startswith("Ses05"))
    out = {s: [[dict(u, split=s) for u in dialogues[d]] for d in names if dialogues[d]] for s, names in splits.items()}
    return out, skipped

# ---------------------------------------------------------------- datasets


def resolve_data_dir(data_dir=None) -> Path:
    """The data folder: the argument, else $DIALOGUELLM_DATA, else ./data."""
    return Path(data_dir or os.environ.get("DIALOGUELLM_DATA") or "data")


def _emory_path(root: Path, fmt: str, split: str) -> Path:
    """The EmoryNLP file of a split: data_dir/emorynlp/ first, then data_dir/emorynlp/meld_repo_csv/."""
    name = EMORY_FILES[fmt].format(split if fmt == "csv" else EMORY_JSON_SPLIT[split])
    return next((p for p in (root / "emorynlp" / name, root / "emorynlp/meld_repo_csv" / name) if p.exists()),
                root / "emorynlp" / name)


def _files(dataset: str, root: Path) -> list[Path]:
    """The files a dataset needs (all splits)."""
    if dataset == "meld":
        return [root / "meld" / name for name in MELD_SHA256]
    if dataset == "iemocap":
        return [root / "iemocap/IEMOCAP_full_release" / f"Session{i}" for i in range(1, 6)]
    return [_emory_path(root, "json" if dataset == "emorynlp-json" else "csv", s) for s in SPLITS]


def load_split(dataset: str, split: str, data_dir=None) -> list[list[dict]]:
    """Dialogues of one split: list of dialogues, each a list of utterance dicts in order.

    dataset: "meld", "emorynlp" (COSMIC-style CSV), "emorynlp-json" (official JSON) or "iemocap".
    Missing MELD CSVs are downloaded (fetch_meld). Raises ValueError on an unknown dataset/split or bad data,
    FileNotFoundError on a missing file."""
    if dataset not in LABELS or split not in SPLITS:
        raise ValueError(f"unknown dataset/split {dataset}/{split}; expected {list(LABELS)} / {SPLITS}")
    root = resolve_data_dir(data_dir)
    if dataset == "iemocap":
        missing = [str(p) for p in _files(dataset, root) if not p.is_dir()]
        if missing:
            raise FileNotFoundError(f"IEMOCAP folders not found: {missing}")
        splits, skipped = load_iemocap(root / "iemocap/IEMOCAP_full_release")
        print(f"iemocap: skipped utterances {dict(skipped)}")
        return splits[split]
    path = _files(dataset, root)[SPLITS.index(split)]
    if dataset == "meld" and not path.exists():
        fetch_meld(path)
    loader = {"meld": load_meld, "emorynlp": load_emorynlp_csv, "emorynlp-json": load_emorynlp_json}[dataset]
    return loader(path, split)


def datasets_for(name: str, data_dir=None) -> list[str]:
    """Dataset names for a --data value: one name, a comma list, or "all" = those of meld, emorynlp (CSV), iemocap
    whose files exist; the ones not found are printed, none found -> FileNotFoundError. emorynlp-json is the same
    benchmark as emorynlp (a superset of it), so "all" never adds it; name it explicitly."""
    if name != "all":
        names = name.split(",")
        bad = [n for n in names if n not in LABELS]
        if bad:
            raise ValueError(f"unknown dataset(s) {bad}; expected {list(LABELS)} or 'all'")
        return names
    root = resolve_data_dir(data_dir)
    found = [d for d in ("meld", "emorynlp", "iemocap") if all(p.exists() for p in _files(d, root))]
    print(f"--data all: using {found}; not found in {root}: {sorted({'meld', 'emorynlp', 'iemocap'} - set(found))}")
    if not found:
        raise FileNotFoundError(f"--data all: no dataset found in {root}")
    return found

# ---------------------------------------------------------------- video descriptions


def load_descriptions(path) -> dict[tuple, str]:
    """JSONL {"dataset", "split", "dialogue_id", "utterance_id", "description"} per line ->
    {(dataset, split, dialogue_id, utterance_id): description}. Raises ValueError naming file:line."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                out[r["dataset"], r["split"], r["dialogue_id"], r["utterance_id"]] = r["description"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e!r}; expected a JSON object with dataset, split, dialogue_id, "
                                 "utterance_id, description") from None
    return out


def convert_meld_annotations(src_json, out_jsonl) -> int:
    """EmotionConflict/Meld-Captioning sorted_annotations.json (MELD test clips "diaX_uttY.mp4") -> descriptions
    JSONL; returns the record count. Raises ValueError naming a record with a bad video_id or missing field."""
    rows = []
    for i, rec in enumerate(json.loads(Path(src_json).read_text(encoding="utf-8"))):
        m = re.fullmatch(r"dia(\d+)_utt(\d+)\.mp4", str(rec.get("video_id")))
        if not m or not isinstance(rec.get("visual_objective_description"), str):
            raise ValueError(f"{src_json}: record {i}: need video_id 'diaX_uttY.mp4' and visual_objective_description")
        # Only the objective visual description: fine-grained_summary was written by a model GIVEN THE GOLD LABEL,
        # and coarse-grained_summary mixes in the audio model's emotion guesses; both would leak the answer.
        rows.append({"dataset": "meld", "split": "test", "dialogue_id": int(m[1]), "utterance_id": int(m[2]),
                     "description": fix_text(rec["visual_objective_description"])})
    Path(out_jsonl).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)

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
    has_description, context, target, description}; context = the `window` previous utterances."""
    if window < 0:
        raise ValueError(f"window (previous utterances in the context) must be >= 0, got {window}")
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
    (SentencePiece gives "neutral" alone as "▁neutral" but after "\\n" as "neut", "ral".) Raises ValueError
    if the prefix tokens change when the label is appended."""
    prefix = tok.encode(RESPONSE)
    out = {}
    for label in labels:
        ids = tok.encode(RESPONSE + label)
        if ids[:len(prefix)] != prefix or len(ids) == len(prefix):
            raise ValueError(f"label {label!r}: encoding {RESPONSE!r} + label does not extend encoding {RESPONSE!r}")
        out[label] = ids[len(prefix):]
    return out


def encode_example(tok, example: dict, max_len: int) -> tuple[list[int], int]:
    """BOS + prompt + label ids + EOS as token ids (list[int], len <= max_len), and n_answer = label ids + 1 (the
    last n_answer ids; the loss goes only there). Context utterances are dropped oldest first until it fits;
    ValueError (naming dialogue/utterance and lengths) if it does not fit even without context."""
    answer = label_token_ids(tok, [example["label"]])[example["label"]] + [tok.eos_id]
    context = example["context"]
    for k in range(len(context) + 1):
        prompt = make_prompt(context[k:], example["target"], example["labels"], example["description"])
        ids = tok.encode(prompt, bos=True)
        if len(ids) + len(answer) <= max_len:
            return ids + answer, len(answer)
    raise ValueError(f"{example['dataset']} dialogue {example['dialogue_id']} utterance {example['utterance_id']}: "
                     f"{len(ids)} prompt + {len(answer)} answer tokens without context > max_len {max_len}")

# ---------------------------------------------------------------- CLI


def _stats(args) -> None:
    """Per split: dialogues, utterances, label counts, prompt+answer length percentiles in tokens."""
    import numpy as np
    import llama
    tok = llama.load_tokenizer(args.model)
    descriptions = load_descriptions(args.descriptions) if args.descriptions else None
    for dataset in datasets_for(args.data, args.data_dir):
        answers = {k: len(v) + 1 for k, v in label_token_ids(tok, LABELS[dataset]).items()}
        for split in SPLITS:
            try:
                dialogues = load_split(dataset, split, args.data_dir)
            except FileNotFoundError as e:
                print(f"{dataset} {split}: not found ({e})")
                continue
            examples = build_examples(dialogues, args.window, descriptions)
            lengths = [len(tok.encode(e["prompt"], bos=True)) + answers[e["label"]] for e in examples]
            p = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
            print(f"{dataset} {split}: {len(dialogues)} dialogues, {len(examples)} utterances, "
                  f"{sum(e['has_description'] for e in examples)} with description")
            print(f"  labels {dict(collections.Counter(e['label'] for e in examples).most_common())}")
            print(f"  tokens (window {args.window}) p50 {p[0]} p90 {p[1]} p99 {p[2]} max {p[3]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="meld", help="meld, emorynlp, emorynlp-json, iemocap, a comma list, or all")
    ap.add_argument("--data-dir", default=None, help="default: $DIALOGUELLM_DATA, else ./data")
    ap.add_argument("--stats", action="store_true", help="print split sizes, label counts and prompt lengths")
    ap.add_argument("--model", default="default", help="tokenizer for --stats: 'default' or a checkpoint folder")
    ap.add_argument("--window", type=int, default=2, help="previous utterances in the context (for --stats)")
    ap.add_argument("--descriptions", default=None, help="descriptions JSONL (for --stats)")
    ap.add_argument("--convert-descriptions", nargs=2, metavar=("SRC", "OUT"),
                    help="convert Meld-Captioning sorted_annotations.json to descriptions JSONL")
    args = ap.parse_args()
    if args.convert_descriptions:
        n = convert_meld_annotations(*args.convert_descriptions)
        print(f"wrote {n} descriptions to {args.convert_descriptions[1]}")
    elif args.stats:
        _stats(args)
    else:
        ap.print_help(sys.stderr)
