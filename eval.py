"""Evaluate a DialogueLLM adapter: `python eval.py ckpt.pt [--split test] [--data meld] [--limit N]`.

Each utterance is labelled by scoring every candidate label's log-probability after its prompt (the prompt runs
once, the labels reuse its KV cache), so every prediction is a valid label. `--generate` decodes greedily
instead and counts answers that name no label as wrong (DialogueLLM's released code picked a random label).
Metrics follow scikit-learn's definitions: weighted F1 weights each class's F1 by its support in y_true.
"""
import argparse
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import llama
import lora


def metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, weighted and macro F1, per-class precision/recall/F1/support and the confusion matrix.

    Arguments are y_true first (as scikit-learn's f1_score). Predictions outside `labels` (invalid answers)
    count as wrong. confusion[i][j] = count of gold labels[i] predicted labels[j]. A class with no prediction
    or no support gets precision or recall 0 (scikit-learn's zero_division=0); macro F1 averages all `labels`.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    idx = {l: i for i, l in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)  # last column: invalid predictions
    for t, p in zip(y_true, y_pred):
        cm[idx[t], idx.get(p, len(labels))] += 1
    tp, support, predicted = np.diag(cm[:, :-1]), cm.sum(1), cm[:, :-1].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / predicted)
        recall = np.nan_to_num(tp / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    n = max(support.sum(), 1)
    return {"n": int(support.sum()), "accuracy": float(tp.sum() / n), "weighted_f1": float((f1 * support).sum() / n),
            "macro_f1": float(f1.mean()),
            "invalid": int(cm[:, -1].sum()), "labels": labels, "confusion": cm[:, :-1].tolist(),
            "per_class": {l: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, l in enumerate(labels)}}


def fit_label_bias(scores: np.ndarray, y_true: list[str], labels: list[str], passes: int = 3) -> np.ndarray:
    """Per-label offsets b (C,) added to label log-probabilities before the argmax, chosen on dev data to
    maximise weighted F1 (coordinate ascent over a grid of -4..4 nats). It corrects the model's prior towards
    the majority class (MELD is 47% neutral); fit on dev only, then applied unchanged to test.
    scores: (N, C) log-probabilities in `labels` order."""
    bias, grid = np.zeros(len(labels)), np.linspace(-4, 4, 81)
    f1 = lambda b: metrics(y_true, [labels[j] for j in (scores + b).argmax(1)], labels)["weighted_f1"]
    best = f1(bias)
    for _ in range(passes):
        for c in range(len(labels)):
            for v in grid:
                trial = bias.copy()
                trial[c] = v
                if (f := f1(trial)) > best + 1e-9:
                    best, bias = f, trial
    return bias


def prompt_ids(tok, example: dict, max_len: int) -> list[int]:
    """The encoded prompt of an example (BOS + prompt), truncated exactly as in training."""
    ids, n_answer = data.encode_example(tok, example, max_len)
    return ids[:-n_answer]


@torch.no_grad()
def predict(model, tok, examples: list[dict], max_len: int, batch_size: int = 8, generate: bool = False,
            progress: bool = True) -> list[dict]:
    """Label every example; returns one dict per example: dialogue_id, utterance_id, dataset, gold, pred, scores.

    Score mode: log P(label tokens | prompt) for each candidate label (llama.score_continuations); the
    candidates are the label words as they appear after the prompt (data.label_token_ids), with EOS appended
    only when one label's ids are a prefix of another's. Generate mode: greedy decoding; pred is the label
    whose text equals the answer (case-insensitive, stripped), else the raw answer (counted invalid by metrics).
    """
    model.eval()
    out, label_ids = [None] * len(examples), {}
    order = sorted(range(len(examples)), key=lambda i: (examples[i]["labels"], len(examples[i]["prompt"])))
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, smoothing=0.1)
    for start in range(0, len(order), batch_size):
        groups = {}  # examples of different datasets have different label sets
        for i in order[start:start + batch_size]:
            groups.setdefault(tuple(examples[i]["labels"]), []).append(i)
        for labels, idx in groups.items():
            prompts = [prompt_ids(tok, examples[i], max_len) for i in idx]
            if generate:
                for i, p in zip(idx, prompts):
                    answer = tok.decode(llama.generate(model, p, 8, eos_id=tok.eos_id)).strip()
                    out[i] = _row(examples[i], next((l for l in labels if l.lower() == answer.lower()), answer), None)
                continue
            if labels not in label_ids:
                ids = data.label_token_ids(tok, list(labels))
                cands = [ids[l] for l in labels]
                prefix = any(a != b and b[:len(a)] == a for a in cands for b in cands)
                label_ids[labels] = [c + [tok.eos_id] * prefix for c in cands]
            scores = llama.score_continuations(model, prompts, label_ids[labels], tok.pad_id)
            for i, s in zip(idx, scores.tolist()):
                out[i] = _row(examples[i], labels[int(np.argmax(s))], dict(zip(labels, s)))
        bar.update(min(batch_size, len(order) - start))
    bar.close()
    return out


def _row(ex, pred, scores):
    return {"dataset": ex["dataset"], "dialogue_id": ex["dialogue_id"], "utterance_id": ex["utterance_id"],
            "gold": ex["label"], "pred": pred, "scores": scores}


def calibrate(rows: list[dict], bias: dict[str, list[float]] | None = None):
    """Fit (bias=None) or apply per-dataset label offsets (fit_label_bias) to score-mode rows, in place.

    Returns the bias dict {dataset: [offset per label of data.LABELS[dataset]]}."""
    if bias is None:
        bias = {}
        for name in sorted({r["dataset"] for r in rows}):
            rs = [r for r in rows if r["dataset"] == name]
            s = np.array([[r["scores"][l] for l in data.LABELS[name]] for r in rs])
            bias[name] = fit_label_bias(s, [r["gold"] for r in rs], data.LABELS[name]).tolist()
    for r in rows:
        labels = data.LABELS[r["dataset"]]
        r["pred"] = labels[int(np.argmax([r["scores"][l] + b for l, b in zip(labels, bias[r["dataset"]])]))]
    return bias


def report(rows: list[dict]) -> dict:
    """Metrics per dataset (and for the union when several), from predict()'s rows."""
    res = {}
    for name in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == name]
        res[name] = metrics([r["gold"] for r in rs], [r["pred"] for r in rs], data.LABELS[name])
    if len(res) > 1:
        union = sorted({l for name in res for l in data.LABELS[name]})
        res["union"] = metrics([r["gold"] for r in rows], [r["pred"] for r in rows], union)
    return res


def load_checkpoint(path, device="cpu", dtype=None):
    """Rebuild (model with adapter, tokenizer, checkpoint dict) from a train.py checkpoint alone.

    Loaded with torch.load(weights_only=True): a checkpoint holding arbitrary pickled objects is refused.
    """
    ckpt = lora.read_checkpoint(path)
    cfg = ckpt["config"]
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model, tok = llama.load(cfg["model"], device=device, dtype=dtype)
    if "model_args" in ckpt and ckpt["model_args"] != asdict(model.args):
        raise ValueError(f"{path}: trained on a model with {ckpt['model_args']}, "
                         f"but {cfg['model']} has {asdict(model.args)}")
    lora.apply_lora(model, cfg["targets"].split(","), cfg["r"], cfg["lora_alpha"], verbose=False)
    lora.load_lora_state_dict(model, ckpt["lora"], path)
    lora.merge_all(model)  # inference only: fold B A into the base weights, one matmul per layer
    return model.to(device).eval(), tok, ckpt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", nargs="?", help="checkpoint from train.py (omit with --zero-shot)")
    p.add_argument("--data", help="dataset(s): meld, emorynlp, iemocap, a comma list or all (default: the trained one)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, help="first N utterances only")
    p.add_argument("--descriptions", help="video descriptions JSONL merged into the prompts; the utterances that have "
                   "one are also scored without it, as a with/without comparison")
    p.add_argument("--described-only", action="store_true", help="only the utterances that have a description")
    p.add_argument("--generate", action="store_true", help="greedy decoding instead of label scoring")
    p.add_argument("--no-calibration", action="store_true", help="ignore the label offsets fitted on dev")
    p.add_argument("--zero-shot", action="store_true", help="the base model with no adapter")
    p.add_argument("--model", default="default", help="base model for --zero-shot")
    p.add_argument("--window", type=int, default=2, help="context window for --zero-shot")
    p.add_argument("--max-len", type=int, help="max prompt+answer tokens (default: the checkpoint's, or 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.zero_shot:
        model, tok = llama.load(a.model, device=a.device, dtype=torch.bfloat16 if "cuda" in a.device else torch.float32)
        cfg, ckpt, out = {"data": "meld", "window": a.window, "max_len": 256}, {}, Path(a.out or "runs/zero-shot")
    elif a.ckpt:
        model, tok, ckpt = load_checkpoint(a.ckpt, a.device)
        cfg, out = ckpt["config"], Path(a.out or Path(a.ckpt).parent)
    else:
        p.error("give a checkpoint, or --zero-shot")
    max_len = a.max_len or cfg["max_len"]
    bias = None if a.generate or a.no_calibration else ckpt.get("label_bias")  # offsets fitted on dev by train.py

    def run(descriptions, keep=None):
        examples = []
        for name in data.datasets_for(a.data or cfg["data"], a.data_dir):
            examples += data.build_examples(data.load_split(name, a.split, a.data_dir), cfg["window"], descriptions)
        examples = [e for e in examples if keep is None or keep(e)][:a.limit]
        rows = predict(model, tok, examples, max_len, a.batch_size, a.generate)
        raw = {k: v["weighted_f1"] for k, v in report(rows).items()}
        if bias:
            calibrate(rows, bias)
        return examples, rows, dict(report(rows), uncalibrated_weighted_f1=raw)

    t0 = time.time()
    descriptions = data.load_descriptions(a.descriptions) if a.descriptions else None
    examples, rows, res = run(descriptions, (lambda e: e["has_description"]) if a.described_only else None)
    if descriptions:  # records for other splits are expected; say how many found an utterance here
        print(f"{sum(e['has_description'] for e in examples)} of {len(descriptions)} descriptions matched an "
              f"utterance of {a.split}" + (f" (first {a.limit})" if a.limit else ""))
    res["seconds"] = round(time.time() - t0, 1)
    if descriptions:
        keys = {(e["dataset"], e["dialogue_id"], e["utterance_id"]) for e in examples if e["has_description"]}
        with_desc = [r for r in rows if (r["dataset"], r["dialogue_id"], r["utterance_id"]) in keys]
        _, _, without = run(None, lambda e: (e["dataset"], e["dialogue_id"], e["utterance_id"]) in keys)
        res["described_utterances"] = {"n": len(keys), "with_description": report(with_desc), "without": without}
    out = out / (f"eval-{a.split}" + "-generate" * a.generate + "-descriptions" * bool(descriptions)
                 + "-described" * a.described_only + (f"-limit{a.limit}" if a.limit else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def show(title, res):
        for name, m in res.items():
            if isinstance(m, dict) and "weighted_f1" in m:
                print(f"{title}{name} {a.split}: weighted F1 {100 * m['weighted_f1']:.2f}  accuracy "
                      f"{100 * m['accuracy']:.2f}  macro F1 {100 * m['macro_f1']:.2f}  invalid {m['invalid']}  n={m['n']}")
    show("", res)
    if bias:
        print("  without the dev-fitted label offsets: weighted F1 "
              + ", ".join(f"{k} {100 * v:.2f}" for k, v in res["uncalibrated_weighted_f1"].items()))
    if descriptions:
        d = res["described_utterances"]
        print(f"{d['n']} utterances have a video description:")
        show("  with it:    ", d["with_description"])
        show("  without it: ", d["without"])
    print("predicted:", dict(Counter(r["pred"] for r in rows).most_common()))
    print(f"wrote {out}/metrics.json and predictions.jsonl ({res['seconds']} s)")


if __name__ == "__main__":
    main()
