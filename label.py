"""Label your own conversations: `python eval.py ckpt.pt --input talks.jsonl > labels.jsonl`.

Reading and checking the input (JSONL conversations or a CSV with MELD's columns), before the model
loads; labelling each utterance exactly as evaluation does (the checkpoint's window, max_len, template
and dev-fitted label offsets, through eval.predict, which eval.py passes in: this file imports nothing
of eval.py); writing one JSON line per utterance to stdout, a chunk of conversations at a time."""
import contextlib
import json
import sys

import numpy as np
import torch

import cli
import convert
import data
import llama

LABEL_CHUNK = 512  # utterances labelled, then written, at a time: sorted by length into full batches

# ---------------------------------------------------------------- reading and checking the input

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

def _read_csv(path) -> list[dict]:
    """Conversations from a CSV with MELD's columns Dialogue_ID, Utterance_ID, Speaker, Utterance, each
    put in Utterance_ID order. UserError naming file:line."""
    ints = ("Dialogue_ID", "Utterance_ID")
    dialogues = {}
    for where, r in cli.csv_rows(path, ["Speaker", "Utterance", *ints], ints, multiline=True):
        dialogue = dialogues.setdefault(r[ints[0]], {})
        if r[ints[1]] in dialogue:
            raise cli.UserError(f"{where}: Dialogue_ID {r[ints[0]]} Utterance_ID {r[ints[1]]} again")
        dialogue[r[ints[1]]] = (dict(speaker=r["Speaker"], text=r["Utterance"]), f"{where}:")
    return [dict(id=d, utterances=[u[k][0] for k in sorted(u)], where=[u[k][1] for k in sorted(u)])
            for d, u in dialogues.items()]

def read_conversations(path, fmt: str) -> list[dict]:
    """Conversations from JSONL (fmt "jsonl": one per line, as check_conversation) or a CSV (fmt "csv",
    _read_csv). UserError naming file:line."""
    if fmt == "csv":
        return _read_csv(path)
    conversations = [check_conversation(record, where, n) for n, (where, record) in enumerate(cli.jsonl_records(path))]
    if not conversations:
        raise cli.UserError(f"{cli.shown(path)}: no conversation; expected one JSON object per line")
    return conversations

def check_fits(tok, conversations: list[dict], labels: list[str], max_len: int) -> None:
    """UserError naming where an utterance was read and its key when its speaker, or its description,
    leaves no token of max_len for the utterance (with the longest label): said before the model loads."""
    ids = data.label_token_ids(tok, labels)
    longest = max(labels, key=lambda label: len(ids[label]))
    fitted = set()
    for c in conversations:
        for u, where in zip(c["utterances"], c["where"]):
            for key in ("speaker", "description"):
                parts = (data.fix_text(u["speaker"]), u.get("description") if key == "description" else None)
                if (key == "description" and not parts[1]) or parts in fitted:
                    continue
                example = dict(label=longest, labels=labels, context=[], description=parts[1], dataset="input",
                               dialogue_id=c["id"], utterance_id=0, target=dict(speaker=parts[0], text=""))
                try:
                    data.encode_example(tok, example, max_len)
                except cli.UserError:
                    raise cli.UserError(f"{where} key {key!r} ({len(u[key])} characters) leaves no room for the "
                                        f"utterance within the checkpoint's max_len {max_len}; shorten it") from None
                fitted.add(parts)

def cut_to_fit(tok, example: dict, max_len: int) -> bool:
    """Cut the target text from its start, a tenth at a time, until encode_example fits it; True if cut."""
    given = example["target"]["text"]
    while True:
        try:
            data.encode_example(tok, dict(example, context=[]), max_len)
            return example["target"]["text"] != given
        except cli.UserError:
            text = example["target"]["text"]
            if not text:
                raise  # the prompt does not fit even without the utterance's text
            example["target"] = dict(example["target"], text=text[len(text) // 10 + 1:])

# ---------------------------------------------------------------- labelling and writing the labels

def pick_label_set(ckpt: dict, name: str | None = None) -> str:
    """`name`, else the first dataset the checkpoint was trained on; UsageError listing them if not one."""
    trained = ckpt["config"]["data"]
    names = list(ckpt.get("labels") or (data.DATASETS if trained == "all" else trained.split(",")))
    cli.check_names("--label-set", [name or names[0]], names)
    return name or names[0]

def _examples(tok, cfg: dict, name: str, conversations: list[dict]) -> list[dict]:
    """The conversations as data.build_examples' examples of label set `name`, each utterance cut to fit
    max_len (a warning counts them). The gold label is unknown: the longest label keeps its room."""
    ids = data.label_token_ids(tok, data.LABELS[name])
    longest = max(data.LABELS[name], key=lambda label: len(ids[label]))
    dialogues = [[dict(dataset=name, split="input", dialogue_id=n, utterance_id=i, label=longest,
                       speaker=data.fix_text(u["speaker"]), text=data.fix_text(u["text"]))
                  for i, u in enumerate(c["utterances"])] for n, c in enumerate(conversations)]
    descriptions = {data.utterance_key(u): conversations[n]["utterances"][i].get("description")
                    for n, d in enumerate(dialogues) for i, u in enumerate(d)}
    examples = data.build_examples(dialogues, cfg["window"], descriptions)
    n_cut = sum(cut_to_fit(tok, e, cfg["max_len"]) for e in examples)
    if n_cut:
        print(f"warning: cut the start of {n_cut} utterance(s) over max_len {cfg['max_len']}", file=sys.stderr)
    return examples

def label_conversations(predict, model, tok, ckpt: dict, conversations: list, label_set: str | None = None,
                        batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Label each utterance of `conversations` (see check_conversation) as evaluation does: `predict` (eval.predict)
    with the checkpoint's window, max_len, template and dev-fitted offsets, and the labels of pick_label_set. One
    row per utterance, in order: id, index, speaker, text (as given), label, probs {label: softmax of offset scores}."""
    cfg = ckpt["config"]
    name = pick_label_set(ckpt, label_set)
    labels = data.LABELS[name]
    conversations = [check_conversation(c, f"conversation {n}", n) for n, c in enumerate(conversations)]
    examples = _examples(tok, cfg, name, conversations)
    rows = predict(model, tok, examples, cfg["max_len"], batch_size, progress=progress)
    bias = (ckpt.get("label_bias") or {}).get(name, [0.0] * len(labels))  # none: trained without calibration
    out = []
    for r in rows:
        conversation = conversations[r["dialogue_id"]]
        u = conversation["utterances"][r["utterance_id"]]
        shifted = [r["scores"][label] + b for label, b in zip(labels, bias)]  # the offsets applied
        probs = torch.tensor(shifted, dtype=torch.float64).softmax(0).tolist()
        out.append(dict(id=conversation["id"], index=r["utterance_id"], speaker=u["speaker"], text=u["text"],
                        label=labels[int(np.argmax(shifted))], probs=dict(zip(labels, probs))))
    return out

def main(a, predict) -> None:
    """eval.py --input: labels as JSON lines on stdout, all else on stderr; input checked before the model loads.
    Labels are written in input order as each chunk of conversations finishes. `predict`: eval.predict."""
    cli.check_streams(stdin=a.input == "-")
    ckpt = cli.read_checkpoint(a.ckpt)
    cfg = convert.run_config(ckpt, a.ckpt)  # UserError for a config without the keys used here
    name = pick_label_set(ckpt, a.label_set)
    conversations = read_conversations(a.input, a.format)  # "-": stdin
    tok = llama.load_tokenizer(convert.model_dir(cfg["model"]))
    check_fits(tok, conversations, data.LABELS[name], cfg["max_len"])
    print(f"label set: {name} {data.LABELS[name]}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the labels only
        model, tok, _ = convert.load_checkpoint(a.ckpt, a.device, ckpt=ckpt)

    def lines(part):
        with contextlib.redirect_stdout(sys.stderr):
            rows = label_conversations(predict, model, tok, ckpt, part, name, a.batch_size)
        return [json.dumps(r) + "\n" for r in rows]
    parts = list(cli.chunks(conversations, LABEL_CHUNK, weight=lambda c: len(c["utterances"])))
    cli.stream_lines(parts, lines, "conversations")
