"""Evaluate a DialogueLLM adapter: `python eval.py ckpt.pt [--split test] [--data meld] [--limit
N]`.

Each utterance is labelled by scoring every candidate label's log-probability after its prompt (the
prompt runs once, the labels reuse its KV cache), so every prediction is a valid label. `--generate`
decodes greedily and counts an answer that names no label as wrong (DialogueLLM's released code
picked a random label instead). Metrics follow scikit-learn: weighted F1 weights each class's F1 by
its support in y_true."""
import argparse
import time

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
    """Accuracy, weighted and macro F1, per-class precision/recall/F1/support,
    confusion[gold][predicted], as scikit-learn computes them with zero_division=0 (y_true first). A
    prediction outside `labels` is wrong."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)  # gold x pred, +invalid
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
    weighted_f1 = (f1 * support).sum() / n  # each class's F1 weighted by its gold support
    per_class = {label: dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                             support=int(support[i])) for i, label in enumerate(labels)}
    return {"n": int(support.sum()), "accuracy": float(tp.sum() / n), "weighted_f1": float(weighted_f1),
            "macro_f1": float(f1.mean()), "invalid": int(cm[:, -1].sum()), "labels": labels,
            "confusion": cm[:, :-1].tolist(), "per_class": per_class}

# ---------------------------------------------------------------- label offsets (not the paper's)
# The paper predicts the label of highest score. The per-label offsets below are this project's addition:
# fitted on dev (fit_offsets), saved in ckpt.pt, applied unchanged to test (apply_offsets); evaluation also
# reports the score without them ("uncalibrated").

def fit_label_bias(scores: np.ndarray, y_true: list[str], labels: list[str], passes: int = 3) -> np.ndarray:
    """Offsets b (M,) added to the M labels' log-probabilities scores (N, M) before the argmax,
    fitted on dev by coordinate ascent over -4..4 nats to maximise weighted F1. They correct a small
    model's lean towards the majority class (MELD is 47% neutral)."""
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

def fit_offsets(rows: list[dict]) -> dict[str, list[float]]:
    """Label offsets fitted per dataset on score-mode rows: {dataset: [offset per label]}."""
    bias = {}
    for name in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == name]
        labels = data.LABELS[name]
        scores = np.array([[r["scores"][label] for label in labels] for r in subset])  # (N, M)
        bias[name] = fit_label_bias(scores, [r["gold"] for r in subset], labels).tolist()
    return bias

def offset_pred(row: dict, offsets: list[float]) -> str:
    """The label of highest score + offset for one score-mode row."""
    labels = data.LABELS[row["dataset"]]
    shifted = [row["scores"][label] + b for label, b in zip(labels, offsets)]
    return labels[int(np.argmax(shifted))]

def apply_offsets(rows: list[dict], bias: dict[str, list[float]]) -> list[dict]:
    """New rows whose pred takes the offsets `bias` into account; the rows given are left as they
    are. A dataset without offsets keeps its raw argmax."""
    return [dict(r, pred=offset_pred(r, bias[r["dataset"]])) if r["dataset"] in bias else r for r in rows]

# ---------------------------------------------------------------- prediction

def prompt_ids(tok, example: dict, max_len: int) -> list[int]:
    """BOS + prompt ids of an example, truncated exactly as in training: with room for the longest
    label of its set, so how much context is cut never depends on the gold label
    (data.encode_example)."""
    ids, n_answer = data.encode_example(tok, example, max_len)
    return ids[:-n_answer]

def candidate_ids(tok, labels: tuple[str, ...]) -> list[list[int]]:
    """Each label's ids as they follow the prompt; EOS is appended only when one label's ids are a
    prefix of another's ("sad" and "sadness"), so that every candidate is scored to its end."""
    ids = data.label_token_ids(tok, list(labels))
    cands = [ids[label] for label in labels]
    is_prefix = any(a != b and b[:len(a)] == a for a in cands for b in cands)
    if is_prefix:
        cands = [c + [tok.eos_id] for c in cands]
    return cands

def header_length(prompts: list[list[int]]) -> int:
    """How many tokens all prompts start with (BOS, the task and the labels: the instruction
    header), leaving each prompt at least one token of its own."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts:
        n = next((j for j in range(n) if p[j] != first[j]), n)
    return n

def group_by_labels(examples: list[dict], prompts: list[list[int]]) -> dict[tuple, list[int]]:
    """Indices of the examples per label set (datasets differ), each sorted by prompt length."""
    groups = {}
    for i in sorted(range(len(examples)), key=lambda i: len(prompts[i])):
        groups.setdefault(tuple(examples[i]["labels"]), []).append(i)
    return groups

def predict_scores(model, tok, labels: tuple, prompts: list[list[int]], batch_size: int, bar) -> list:
    """(pred, {label: log P(label tokens | prompt)}) per prompt of one label set: the header all its
    prompts share runs once (llama.prefill), then each batch of their own tokens with every label
    (llama.score_continuations); pred is the label of highest score."""
    P = header_length(prompts)
    prefix = llama.prefill(model, prompts[0][:P]) if P else None
    candidates = candidate_ids(tok, labels)
    out = []
    for start in range(0, len(prompts), batch_size):
        rests = [p[P:] for p in prompts[start:start + batch_size]]  # each prompt after the header
        scores = llama.score_continuations(model, rests, candidates, tok.pad_id, prefix)  # (B, M)
        out += [(labels[int(np.argmax(row))], dict(zip(labels, row))) for row in scores.tolist()]
        bar.update(len(rests))
    return out

def predict_generate(model, tok, labels: tuple, prompts: list[list[int]], batch_size: int, bar) -> list:
    """(pred, None) per prompt: the label a greedy answer of up to 8 tokens names (any case), else
    the answer itself, an invalid prediction."""
    out = []
    for p in prompts:
        answer = tok.decode(llama.generate(model, p, 8, eos_id=tok.eos_id)).strip()
        named = [label for label in labels if label.lower() == answer.lower()]
        out.append((named[0] if named else answer, None))
        bar.update()
    return out

@torch.no_grad()
def predict(model, tok, examples: list[dict], max_len: int, batch_size: int = 8, generate: bool = False,
            progress: bool = True) -> list[dict]:
    """One row per example, in order: dataset, dialogue_id, utterance_id, gold, pred, scores,
    described. Scores per label set (predict_scores), or greedy decoding with scores None
    (predict_generate)."""
    model.eval()
    prompts = [prompt_ids(tok, ex, max_len) for ex in examples]
    run_group = predict_generate if generate else predict_scores
    rows = [None] * len(examples)
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, smoothing=0.1)
    for labels, idx in group_by_labels(examples, prompts).items():
        preds = run_group(model, tok, labels, [prompts[i] for i in idx], batch_size, bar)
        for i, (pred, scores) in zip(idx, preds):
            rows[i] = make_row(examples[i], pred, scores)
    bar.close()
    return rows

def make_row(ex: dict, pred: str, scores: dict | None) -> dict:
    return {"dataset": ex["dataset"], "dialogue_id": ex["dialogue_id"], "utterance_id": ex["utterance_id"],
            "gold": ex["label"], "pred": pred, "scores": scores, "described": ex["has_description"]}

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
    """(report after the label offsets `bias`, or offsets fitted on these rows if `fit`, with each
    dataset's uncalibrated weighted F1 under "uncalibrated_weighted_f1"; the offsets)."""
    if fit:
        bias = fit_offsets(rows)
    res = report(apply_offsets(rows, bias or {}))
    res["uncalibrated_weighted_f1"] = {name: m["weighted_f1"] for name, m in report(rows).items()}
    evaluated = {r["dataset"] for r in rows}
    res["calibrated_datasets"] = sorted(evaluated & set(bias or {}))  # trained datasets only
    res["calibrated"] = bool(res["calibrated_datasets"])
    return res, bias

# ---------------------------------------------------------------- the command line

def parse_args(argv=None) -> argparse.Namespace:
    """eval.py's flags, checked (cli.eval_args)."""
    return cli.eval_args(argv, __doc__.split("\n")[0], data.SPLITS, data.WINDOW, data.DATASETS)

def evaluate_split(model, tok, a, saved: dict, descriptions, keep=None) -> tuple[list[dict], dict]:
    """Rows (with the label offsets applied) and metrics of one evaluation of a split; `keep`
    filters the examples (before --limit). `saved`: the checkpoint's settings (window, max_len,
    data, label_bias)."""
    examples = []
    for name in data.datasets_for(a.data or saved["data"], a.data_dir):
        split = data.load_split(name, a.split, a.data_dir)
        examples += data.build_examples(split, saved["window"], descriptions)
    examples = [e for e in examples if keep is None or keep(e)][:a.limit]
    if not examples:
        raise cli.UserError(f"no {a.split} utterance to evaluate (--data {a.data or saved['data']}, --limit, "
                            "--described-only)")
    rows = predict(model, tok, examples, a.max_len or saved["max_len"], a.batch_size, a.generate)
    bias = None if a.generate or a.no_calibration else saved.get("label_bias")  # dev-fitted
    res, _ = calibrated_report(rows, bias)
    without = sorted({r["dataset"] for r in rows} - set(res["calibrated_datasets"]))
    if bias and without:
        print(f"note: the checkpoint's dev-fitted label offsets are for {', '.join(sorted(bias))} only; "
              f"{', '.join(without)} is scored without offsets")
    return apply_offsets(rows, bias or {}), res

@cli.releasing_locks
def main(argv=None):
    a = parse_args(argv)
    if a.input:
        return labelling.main(a, predict)  # label.py: your own conversations
    saved = dict(data="meld", window=a.window, max_len=data.MAX_LEN)  # --zero-shot
    if a.ckpt:
        ckpt = cli.read_checkpoint(a.ckpt)
        if a.model != "default":  # the base model moved; its shapes are still checked
            ckpt["config"]["model"] = str(convert.model_dir(a.model).resolve())
        saved = dict(convert.run_config(ckpt, a.ckpt),  # as trained
                     label_bias=ckpt.get("label_bias"))
    out = cli.results_dir(a, saved["data"])
    cli.claim_folder(out)  # locked: a second evaluation writing the same files is refused
    if a.ckpt:
        model, tok, _ = load_checkpoint(a.ckpt, a.device, ckpt=ckpt)
    else:
        dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        model, tok = llama.load(convert.model_dir(a.model), device=a.device, dtype=dtype)
    t0 = time.time()
    descriptions = data.load_descriptions(a.descriptions) if a.descriptions else None
    keep = (lambda e: e["has_description"]) if a.described_only else None
    rows, res = evaluate_split(model, tok, a, saved, descriptions, keep)
    if descriptions:
        res["described_utterances"] = compare_descriptions(model, tok, a, saved, rows, len(descriptions))
    res["seconds"] = round(time.time() - t0, 1)
    cli.write_results(out, res, rows)  # first: a closed stdout (`| head`) must not lose them
    cli.show_results("", res, a.split)
    for name in sorted({r["dataset"] for r in rows}):  # the datasets evaluated
        cli.show_classes(res[name])
    if descriptions:
        cli.show_comparison(res["described_utterances"], a.split)

def compare_descriptions(model, tok, a, saved: dict, rows: list[dict], n_records: int) -> dict:
    """Score the utterances that have a description again without it: the with/without
    comparison, {n, records, with_description, without}."""
    described = {data.utterance_key(r, a.split) for r in rows if r["described"]}
    with_it = [r for r in rows if data.utterance_key(r, a.split) in described]
    keep = lambda e: data.utterance_key(e, a.split) in described  # noqa: E731
    _, without = evaluate_split(model, tok, a, saved, None, keep)
    return {"n": len(described), "records": n_records, "with_description": report(with_it), "without": without}

if __name__ == "__main__":
    cli.run(main)
