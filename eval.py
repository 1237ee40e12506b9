"""Evaluate a DialogueLLM adapter: `python eval.py ckpt.pt [--split test] [--data meld] [--limit N]`.

Each utterance is labelled by scoring every candidate label's log-probability after its prompt (the prompt runs
once, the labels reuse its KV cache), so every prediction is a valid label. `--generate` decodes greedily and
counts an answer that names no label as wrong (DialogueLLM's released code picked a random label instead).
Metrics follow scikit-learn: weighted F1 weights each class's F1 by its support in y_true."""
import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cli
import convert
import data
import label as labelling
import llama
from convert import load_checkpoint

# ---------------------------------------------------------------- metrics

def metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, weighted and macro F1, per-class precision/recall/F1/support, confusion[gold][predicted], as
    scikit-learn computes them with zero_division=0 (y_true first). A prediction outside `labels` is wrong."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)  # (gold, predicted); last column: invalid
    for t, p in zip(y_true, y_pred):
        cm[index[t], index.get(p, len(labels))] += 1
    tp = np.diag(cm[:, :-1])
    support = cm.sum(1)  # per gold class
    predicted = cm[:, :-1].sum(0)  # per predicted class
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / predicted)
        recall = np.nan_to_num(tp / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    n = max(support.sum(), 1)
    per_class = {label: dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                             support=int(support[i])) for i, label in enumerate(labels)}
    return {"n": int(support.sum()), "accuracy": float(tp.sum() / n), "weighted_f1": float((f1 * support).sum() / n),
            "macro_f1": float(f1.mean()), "invalid": int(cm[:, -1].sum()), "labels": labels,
            "confusion": cm[:, :-1].tolist(), "per_class": per_class}

def fit_label_bias(scores: np.ndarray, y_true: list[str], labels: list[str], passes: int = 3) -> np.ndarray:
    """Offsets b (C,) added to the label log-probabilities scores (N, C) before the argmax, fitted on dev by
    coordinate ascent over -4..4 nats to maximise weighted F1, then applied unchanged to test. They correct a
    small model's lean towards the majority class (MELD is 47% neutral)."""
    def weighted_f1(bias):
        y_pred = [labels[j] for j in (scores + bias).argmax(1)]
        return metrics(y_true, y_pred, labels)["weighted_f1"]
    bias = np.zeros(len(labels))
    best = weighted_f1(bias)
    for _ in range(passes):
        for c in range(len(labels)):
            for value in np.linspace(-4, 4, 81):
                trial = bias.copy()
                trial[c] = value
                f1 = weighted_f1(trial)
                if f1 > best + 1e-9:
                    best = f1
                    bias = trial
    return bias

# ---------------------------------------------------------------- prediction

def prompt_ids(tok, example: dict, max_len: int) -> list[int]:
    """BOS + prompt ids of an example, truncated exactly as in training: with room for the longest label of its
    set, so how much context is cut never depends on the gold label (data.encode_example)."""
    ids, n_answer = data.encode_example(tok, example, max_len)
    return ids[:-n_answer]

def candidate_ids(tok, labels: tuple[str, ...]) -> list[list[int]]:
    """Each label's ids as they follow the prompt; EOS is appended only when one label's ids are a prefix of
    another's ("sad" and "sadness"), so that every candidate is scored to its end."""
    ids = data.label_token_ids(tok, list(labels))
    cands = [ids[label] for label in labels]
    is_prefix = any(a != b and b[:len(a)] == a for a in cands for b in cands)
    if is_prefix:
        cands = [c + [tok.eos_id] for c in cands]
    return cands

def generate_label(model, tok, prompt: list[int], labels) -> str:
    """Greedy answer of up to 8 tokens: the label it names (case-insensitive), else the raw answer (invalid)."""
    answer = tok.decode(llama.generate(model, prompt, 8, eos_id=tok.eos_id)).strip()
    named = [label for label in labels if label.lower() == answer.lower()]
    return named[0] if named else answer

def header_length(prompts: list[list[int]]) -> int:
    """How many tokens all prompts start with (BOS, the task and the labels: the instruction header), leaving each
    prompt at least one token of its own."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts:
        n = next((j for j in range(n) if p[j] != first[j]), n)
    return n

def headers(model, prompts: dict[tuple, list[list[int]]]) -> dict[tuple, tuple[int, llama.KVCache | None]]:
    """Per label set: (header length P, the header's one-row KV cache, computed once), from its prompts."""
    out = {}
    for labels, group in prompts.items():
        P = header_length(group)
        out[labels] = (P, llama.prefill(model, group[0][:P]) if P else None)
    return out

@torch.no_grad()
def predict(model, tok, examples: list[dict], max_len: int, batch_size: int = 8, generate: bool = False,
            progress: bool = True) -> list[dict]:
    """One row per example, in order: dataset, dialogue_id, utterance_id, gold, pred, scores, described.
    Score mode: scores[label] = log P(label tokens | prompt) (llama.score_continuations, with the header of each
    label set's prompts computed once), pred = the argmax; generate mode: greedy decoding (generate_label), scores
    None. Batches hold one label set, sorted by length."""
    model.eval()
    rows = [None] * len(examples)
    prompts = [prompt_ids(tok, ex, max_len) for ex in examples]
    by_labels = {}
    for ex, p in zip(examples, prompts):
        by_labels.setdefault(tuple(ex["labels"]), []).append(p)
    header = {} if generate else headers(model, by_labels)
    candidates = {labels: candidate_ids(tok, labels) for labels in by_labels}
    order = sorted(range(len(examples)), key=lambda i: (examples[i]["labels"], len(prompts[i])))
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, smoothing=0.1)
    for start in range(0, len(order), batch_size):
        groups = {}  # examples of different datasets have different label sets
        for i in order[start:start + batch_size]:
            groups.setdefault(tuple(examples[i]["labels"]), []).append(i)
        for labels, idx in groups.items():
            if generate:
                for i in idx:
                    rows[i] = make_row(examples[i], generate_label(model, tok, prompts[i], labels), None)
                continue
            P, prefix = header[labels]
            rests = [prompts[i][P:] for i in idx]  # each prompt after the shared header
            scores = llama.score_continuations(model, rests, candidates[labels], tok.pad_id, prefix)  # (B, C)
            for i, row_scores in zip(idx, scores.tolist()):
                pred = labels[int(np.argmax(row_scores))]
                rows[i] = make_row(examples[i], pred, dict(zip(labels, row_scores)))
        bar.update(min(batch_size, len(order) - start))
    bar.close()
    return rows

def make_row(ex: dict, pred: str, scores: dict | None) -> dict:
    return {"dataset": ex["dataset"], "dialogue_id": ex["dialogue_id"], "utterance_id": ex["utterance_id"],
            "gold": ex["label"], "pred": pred, "scores": scores, "described": ex["has_description"]}

def calibrate(rows: list[dict], bias: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Fit (bias=None) or apply per-dataset label offsets (fit_label_bias) to score-mode rows, in place.
    Returns the bias dict {dataset: [offset per label of data.LABELS[dataset]]}."""
    if bias is None:
        bias = {}
        for name in sorted({r["dataset"] for r in rows}):
            subset = [r for r in rows if r["dataset"] == name]
            scores = np.array([[r["scores"][label] for label in data.LABELS[name]] for r in subset])  # (N, C)
            bias[name] = fit_label_bias(scores, [r["gold"] for r in subset], data.LABELS[name]).tolist()
    for r in [r for r in rows if r["dataset"] in bias]:  # a dataset not fitted on keeps its raw argmax
        labels = data.LABELS[r["dataset"]]
        shifted = [r["scores"][label] + b for label, b in zip(labels, bias[r["dataset"]])]
        r["pred"] = labels[int(np.argmax(shifted))]
    return bias

def report(rows: list[dict]) -> dict:
    """Metrics per dataset (and for the union when several), from predict()'s rows."""
    res = {}
    for name in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == name]
        res[name] = metrics([r["gold"] for r in subset], [r["pred"] for r in subset], data.LABELS[name])
    if len(res) > 1:
        union = sorted({label for name in res for label in data.LABELS[name]})
        res["union"] = metrics([r["gold"] for r in rows], [r["pred"] for r in rows], union)
    return res

def calibrated_report(rows: list[dict], bias: dict | None = None, fit: bool = False) -> tuple[dict, dict | None]:
    """(report after the label offsets `bias`, or offsets fitted on these rows if `fit`, with each dataset's
    uncalibrated weighted F1 under "uncalibrated_weighted_f1"; the offsets)."""
    uncalibrated = {name: m["weighted_f1"] for name, m in report(rows).items()}
    if fit or bias:
        bias = calibrate(rows, None if fit else bias)
    res = report(rows)
    res["uncalibrated_weighted_f1"] = uncalibrated
    evaluated = {r["dataset"] for r in rows}
    res["calibrated_datasets"] = sorted(evaluated & set(bias or {}))  # offsets exist only for trained datasets
    res["calibrated"] = bool(res["calibrated_datasets"])
    return res, bias

def label_conversations(*args, **kwargs) -> list[dict]:
    """label.py's label_conversations with this file's predict: (model, tok, ckpt, conversations, ...)."""
    return labelling.label_conversations(predict, *args, **kwargs)

# ---------------------------------------------------------------- the command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", nargs="?", help="checkpoint from train.py (omit with --zero-shot)")
    p.add_argument("--data", help="meld, emorynlp, iemocap, a comma list or all (default: the trained ones)")
    p.add_argument("--split", choices=data.SPLITS, help="default: test")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=cli.positive_int, help="the first N utterances only")
    p.add_argument("--descriptions", help="video descriptions JSONL; described utterances are also scored without")
    p.add_argument("--described-only", action="store_true", help="only the utterances that have a description")
    p.add_argument("--generate", action="store_true", help="greedy decoding instead of label scoring")
    p.add_argument("--no-calibration", action="store_true", help="ignore the label offsets fitted on dev")
    p.add_argument("--zero-shot", action="store_true", help="the base model --model with no adapter")
    p.add_argument("--model", default="default", help="base model for --zero-shot, or the new place of a "
                   "checkpoint's base model folder (its shapes are checked)")
    p.add_argument("--window", type=cli.natural_int, help=f"--zero-shot: context window (default {data.WINDOW})")
    p.add_argument("--max-len", type=cli.positive_int, help="prompt + answer tokens (default: the checkpoint's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--out", help="parent folder of the results (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input", help="label your own conversations: a JSONL or CSV file, or - for stdin")
    p.add_argument("--format", choices=("jsonl", "csv"), help="--input's format (default: from its name)")
    p.add_argument("--label-set", help="--input: the labels of this trained dataset (default: the first)")
    a = p.parse_args(argv)
    flags = {"--data": a.data, "--split": a.split, "--limit": a.limit, "--descriptions": a.descriptions,
             "--generate": a.generate, "--zero-shot": a.zero_shot, "--max-len": a.max_len, "--out": a.out}
    given = [flag for flag, value in flags.items() if value]
    if a.input and given:
        raise cli.UsageError(f"--input labels with the checkpoint's settings; it takes no {', '.join(given)}")
    if not a.input and (a.format or a.label_set):
        raise cli.UsageError("--format and --label-set go with --input")
    a.format = a.format or {".jsonl": "jsonl", ".csv": "csv"}.get(Path(a.input or "").suffix.lower())
    if a.input and not a.format:
        raise cli.UsageError(f"--input {a.input}: give --format jsonl or csv (or a name ending .jsonl or .csv)")
    a.split = a.split or "test"
    if a.window is not None and not a.zero_shot:
        raise cli.UsageError("--window goes with --zero-shot; a checkpoint's evaluation uses its own window")
    if a.window is None:
        a.window = data.WINDOW
    if a.zero_shot == bool(a.ckpt):
        p.error("give a checkpoint, or --zero-shot (not both)")
    if a.described_only and not a.descriptions:
        p.error("--described-only needs --descriptions")
    if a.data:
        cli.check_names("--data", a.data.split(","), (*data.DATASETS, "all"))
    cli.check_device(a.device)
    return a

def results_dir(a: argparse.Namespace, trained_data: str) -> Path:
    """This evaluation's folder: its name encodes every option that changes the results, so variants never share
    a folder, while the same evaluation run again replaces its own."""
    parent = Path(a.out or (Path(a.ckpt).parent if a.ckpt else "runs/zero-shot"))
    options = [  # (option given, its part of the name)
        (a.data and a.data != trained_data, str(a.data).replace(",", "+")),
        (a.descriptions, "descriptions-" + Path(a.descriptions or "").stem),
        (a.described_only, "described"),
        (a.limit, f"limit{a.limit}"),
        (a.max_len, f"len{a.max_len}"),
        (a.generate, "generate"),
        (a.no_calibration and not a.generate, "uncalibrated"),
        (a.ckpt and Path(a.ckpt).stem != "ckpt", Path(a.ckpt or "").stem),  # e.g. ckpt_last: no label offsets
        (a.zero_shot, f"{Path(a.model).name}-window{a.window}"),
    ]
    return parent / "-".join([f"eval-{a.split}"] + [part for given, part in options if given])

def evaluate(model, tok, a, cfg: dict, descriptions, keep=None) -> tuple[list[dict], dict]:
    """Rows and metrics of one evaluation; `keep` filters the examples (before --limit)."""
    examples = []
    for name in data.datasets_for(a.data or cfg["data"], a.data_dir):
        split = data.load_split(name, a.split, a.data_dir)
        examples += data.build_examples(split, cfg["window"], descriptions)
    examples = [e for e in examples if keep is None or keep(e)][:a.limit]
    if not examples:
        raise cli.UserError(f"no {a.split} utterance to evaluate (--data {a.data or cfg['data']}, --limit, "
                            "--described-only)")
    rows = predict(model, tok, examples, a.max_len or cfg["max_len"], a.batch_size, a.generate)
    bias = None if a.generate or a.no_calibration else cfg.get("label_bias")  # offsets fitted on dev by train.py
    res, _ = calibrated_report(rows, bias)
    without = sorted({r["dataset"] for r in rows} - set(res["calibrated_datasets"]))
    if bias and without:
        print(f"note: the checkpoint's dev-fitted label offsets are for {', '.join(sorted(bias))} only; "
              f"{', '.join(without)} is scored without offsets")
    return rows, res

def show(title: str, res: dict, split: str) -> None:
    """One line per dataset: weighted F1 (and without the label offsets, when they were applied), accuracy..."""
    before = res.get("uncalibrated_weighted_f1", {})
    for name, m in res.items():
        if isinstance(m, dict) and "weighted_f1" in m:
            offsets = name in res.get("calibrated_datasets", []) or (name == "union" and res.get("calibrated"))
            raw = f" ({100 * before[name]:.2f} without the dev-fitted label offsets)" if offsets else ""
            print(f"{title}{name} {split}: weighted F1 {100 * m['weighted_f1']:.2f}{raw}  accuracy "
                  f"{100 * m['accuracy']:.2f}  macro F1 {100 * m['macro_f1']:.2f}  invalid {m['invalid']}  n={m['n']}")

def show_classes(m: dict) -> None:
    """Per-class precision, recall, F1 (%) and support, then the confusion matrix (rows gold, columns predicted)."""
    labels = m["labels"]
    width = max(len("gold / predicted"), *map(len, labels)) + 2
    print(f"{'':{width}}precision  recall      F1  support")
    for label in labels:
        c = m["per_class"][label]
        scores = f"{100 * c['precision']:9.2f}{100 * c['recall']:8.2f}{100 * c['f1']:8.2f}"
        print(f"{label:{width}}{scores}{c['support']:9d}")
    print("gold / predicted".ljust(width) + "".join(f"{label[:8]:>9}" for label in labels))
    for label, row in zip(labels, m["confusion"]):
        print(f"{label:{width}}" + "".join(f"{n:9d}" for n in row))

def main(argv=None):
    a = parse_args(argv)
    if a.input:
        return labelling.main(a, predict)  # label.py: your own conversations
    cfg = dict(data="meld", window=a.window, max_len=data.MAX_LEN)  # --zero-shot
    if a.ckpt:
        ckpt = cli.read_checkpoint(a.ckpt)
        if a.model != "default":  # the base model moved: the checkpoint's model_args still guard its shapes
            ckpt["config"]["model"] = str(convert.model_dir(a.model).resolve())
        cfg = dict(convert.run_config(ckpt, a.ckpt), label_bias=ckpt.get("label_bias"))  # as trained
    out = results_dir(a, cfg["data"])
    cli.check_writable(out)
    if a.ckpt:
        model, tok, _ = load_checkpoint(a.ckpt, a.device, ckpt=ckpt)
    else:
        dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        model, tok = llama.load(convert.model_dir(a.model), device=a.device, dtype=dtype)
    t0 = time.time()
    descriptions = data.load_descriptions(a.descriptions) if a.descriptions else None
    keep = (lambda e: e["has_description"]) if a.described_only else None
    rows, res = evaluate(model, tok, a, cfg, descriptions, keep)
    res["seconds"] = round(time.time() - t0, 1)
    show("", res, a.split)
    for name in data.datasets_for(a.data or cfg["data"], a.data_dir):
        show_classes(res[name])
    if descriptions:
        res["described_utterances"] = compare_descriptions(model, tok, a, cfg, rows, len(descriptions))
    print("predicted:", dict(Counter(r["pred"] for r in rows).most_common()))
    out.mkdir(parents=True, exist_ok=True)  # scores first, then the files, each written whole
    cli.atomic_write(out / "metrics.json", json.dumps(res, indent=1))
    cli.atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'} ({res['seconds']} s)")

def compare_descriptions(model, tok, a, cfg: dict, rows: list[dict], n_records: int) -> dict:
    """Score the utterances that have a description again without it: the with/without comparison."""
    described = {data.utterance_key(r, a.split) for r in rows if r["described"]}
    print(f"{len(described)} of {n_records} descriptions matched an utterance of {a.split}")
    with_it = [r for r in rows if data.utterance_key(r, a.split) in described]
    keep = lambda e: data.utterance_key(e, a.split) in described  # noqa: E731
    _, without = evaluate(model, tok, a, cfg, None, keep)
    res = {"n": len(described), "with_description": report(with_it), "without": without}
    show("  with it:    ", res["with_description"], a.split)
    show("  without it: ", res["without"], a.split)
    return res

if __name__ == "__main__":
    cli.run(main)
