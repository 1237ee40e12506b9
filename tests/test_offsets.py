"""The dev-fitted label offsets end to end, and the evaluation variants the README documents.

- eval.fit_label_bias reaches the optimum of a brute-force search over the same grid, and no single-coordinate
  move improves on what it returns;
- a real tiny training run stores in ckpt.pt exactly the offsets fitted on its dev predictions;
- eval.py applies a checkpoint's offsets unchanged to test (planted non-zero offsets give argmax(scores + offsets),
  and fitting anything during evaluation fails the test); --no-calibration gives the raw argmax;
- the best checkpoint is the first step with the highest dev weighted F1; --data all keeps per-dataset labels and
  offsets and reports union metrics; --zero-shot scores with the base model; --descriptions with --described-only
  scores the described utterances with and without their description; every variant has its own folder.
"""
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import convert
import cli
import data
import eval as ev
import llama
import train
from helpers import make_checkpoint, make_meld

MELD = data.LABELS["meld"]
EMORY = data.LABELS["emorynlp"]
GRID = np.linspace(-4, 4, 81)  # fit_label_bias's documented search grid: -4..4 nats in steps of 0.1


# ---------------------------------------------------------------- fit_label_bias against brute force

def weighted_f1(scores, bias, y_true, labels) -> float:
    """scikit-learn's weighted F1 of argmax(scores + bias): the reference, independent of eval.metrics."""
    y_pred = [labels[j] for j in (scores + bias).argmax(1)]
    return f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)


def leaning_case(seed, n, n_labels):
    """Scores (n, C) of a model that knows something (+1.5 nats on the gold label) but leans towards label 0
    (+1.5 on it for every row), as a small model leans towards MELD's majority class; y_true."""
    rng = np.random.default_rng(seed)
    labels = MELD[:n_labels]
    gold = rng.choice(n_labels, size=n, p=np.r_[0.4, np.full(n_labels - 1, 0.6 / (n_labels - 1))])
    scores = rng.normal(0, 1, (n, n_labels))
    scores[np.arange(n), gold] += 1.5
    scores[:, 0] += 1.5
    return scores, [labels[g] for g in gold], labels


def brute_force(scores, y_true, labels):
    """The best weighted F1 over every offset vector with b[0] = 0 and the others on GRID (argmax is unchanged by
    adding a constant to all offsets, so b[0] = 0 loses nothing but offset differences beyond 4 nats)."""
    pred_index = {label: i for i, label in enumerate(labels)}
    gold = np.array([pred_index[y] for y in y_true])
    best, best_bias = -1.0, None
    for rest in itertools.product(GRID, repeat=len(labels) - 1):
        bias = np.r_[0.0, rest]
        pred = (scores + bias).argmax(1)
        f1 = fast_weighted_f1(gold, pred, len(labels))
        if f1 > best + 1e-12:
            best, best_bias = f1, bias
    return best, best_bias


def fast_weighted_f1(gold, pred, n_labels) -> float:
    """Weighted F1 from integer classes with numpy (the brute force runs it 6,561 times); checked against
    scikit-learn on the optimum it returns."""
    cm = np.zeros((n_labels, n_labels))
    np.add.at(cm, (gold, pred), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * tp / (support + predicted))
    return float((f1 * support).sum() / support.sum())


LOCAL_OPTIMUM = pytest.mark.xfail(strict=True, reason="a known defect of eval.fit_label_bias: coordinate ascent stops "
                                  "at weighted F1 0.827 where brute force over the same grid finds 0.929 (offsets "
                                  "(0, 0.5, -0.5)); more passes do not help. strict: passing here means it was fixed")


@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=LOCAL_OPTIMUM), 3, 4, 5])
def test_fit_label_bias_reaches_the_brute_force_optimum(seed):
    """Three labels, 16 rows: coordinate ascent must find offsets at least as good as trying all 81 x 81 offset
    differences. The case is one where offsets matter, so returning zeros (or a worse local optimum) fails."""
    scores, y_true, labels = leaning_case(seed, n=16, n_labels=3)
    best, best_bias = brute_force(scores, y_true, labels)
    assert best == pytest.approx(weighted_f1(scores, best_bias, y_true, labels), abs=1e-12)  # fast == sklearn
    raw = weighted_f1(scores, np.zeros(3), y_true, labels)
    assert best > raw + 0.05, (best, raw)  # the offsets can gain something here
    fitted = ev.fit_label_bias(scores, y_true, labels)
    assert fitted.shape == (3,)
    assert weighted_f1(scores, fitted, y_true, labels) >= best - 1e-12, (fitted, best_bias)


def test_fit_label_bias_is_a_coordinate_optimum_on_seven_labels():
    """On MELD's seven labels and 120 rows (too many for brute force): no move of one offset to any grid value
    improves the weighted F1 of the returned offsets, and they beat no offsets."""
    scores, y_true, labels = leaning_case(7, n=120, n_labels=7)
    fitted = ev.fit_label_bias(scores, y_true, labels)
    got = weighted_f1(scores, fitted, y_true, labels)
    assert got > weighted_f1(scores, np.zeros(7), y_true, labels) + 0.02
    for c, value in itertools.product(range(7), GRID):
        moved = fitted.copy()
        moved[c] = value
        assert weighted_f1(scores, moved, y_true, labels) <= got + 1e-9, (c, value)


# ---------------------------------------------------------------- a real tiny run: offsets into ckpt.pt

def train_argv(folder, data_dir, out, *extra):
    return ["--model", str(folder), "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "2",
            "--grad-accum", "2", "--window", "1", "--warmup", "1", "--lr", "1e-2", "--max-len", "256",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_models):
    """A tiny model trained 2 steps on a synthetic MELD with a dev evaluation after each step, every call of
    fit_label_bias recorded: {folder, data, out, fits: [(scores, y_true, labels, offsets)]}."""
    root = tmp_path_factory.mktemp("offsets")
    folder, data_dir, out = root / "model", make_meld(root / "data", n_dialogues=6, n_utterances=4), root / "run"
    make_checkpoint(folder, shared_models, std=0.3)
    fits, fit = [], ev.fit_label_bias

    def recording(scores, y_true, labels, *args, **kwargs):
        offsets = fit(scores, y_true, labels, *args, **kwargs)
        fits.append((scores.copy(), list(y_true), list(labels), offsets.copy()))
        return offsets
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "fit_label_bias", recording)
        train.main(train_argv(folder, data_dir, out, "--max-steps", "2", "--eval-every", "1"))
    return dict(folder=folder, data=data_dir, out=out, fits=fits)


def test_ckpt_stores_the_offsets_fitted_on_dev(run):
    ckpt = torch.load(run["out"] / "ckpt.pt", weights_only=True)
    assert len(run["fits"]) == 2  # one fit per dev evaluation, after steps 1 and 2
    scores, y_true, labels, offsets = run["fits"][ckpt["step"] - 1]  # the evaluation that made ckpt.pt
    dev = [u["label"] for d in data.load_split("meld", "dev", run["data"]) for u in d]
    assert Counter(y_true) == Counter(dev) and len(y_true) == 24  # fitted on every dev utterance, nothing else
    assert labels == MELD and ckpt["labels"] == {"meld": MELD}
    assert ckpt["label_bias"] == {"meld": offsets.tolist()}
    assert any(offsets != 0)  # this run's random model leans: the offsets are not trivially zero
    # the dev scores kept with the adapter are those of these offsets, and of none
    assert ckpt["dev"]["weighted_f1"] == pytest.approx(weighted_f1(scores, offsets, y_true, MELD), abs=1e-12)
    assert ckpt["dev"]["uncalibrated_weighted_f1"] == pytest.approx(
        weighted_f1(scores, np.zeros(7), y_true, MELD), abs=1e-12)
    assert ckpt["dev"]["weighted_f1"] >= ckpt["dev"]["uncalibrated_weighted_f1"]  # the fit starts from zeros
    logged = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert logged[ckpt["step"] - 1]["dev_weighted_f1"] == ckpt["dev"]["weighted_f1"] == ckpt["best"]


@pytest.fixture(scope="module")
def planted(run, tmp_path_factory):
    """run's ckpt.pt with planted non-zero offsets, in its own folder, and the rows of its --no-calibration
    evaluation on test: (checkpoint path, offsets, uncalibrated rows)."""
    folder = tmp_path_factory.mktemp("planted")
    ckpt = torch.load(run["out"] / "ckpt.pt", weights_only=True)
    ckpt["label_bias"] = {"meld": [0.0] * 7}
    torch.save(ckpt, folder / "ckpt.pt")
    ev.main([str(folder / "ckpt.pt"), "--data-dir", str(run["data"]), "--no-calibration"])  # the raw scores
    raw = read_rows(folder / "eval-test-uncalibrated")
    # Offsets that move some predictions: +0.3 nats more than needed for label `second` to win row 0.
    s = np.array([[r["scores"][label] for label in MELD] for r in raw])
    order = s[0].argsort()
    offsets = np.linspace(-0.3, 0.3, 7)
    offsets[order[-2]] += s[0, order[-1]] - s[0, order[-2]] + 0.3 + (offsets[order[-1]] - offsets[order[-2]])
    ckpt["label_bias"] = {"meld": offsets.tolist()}
    torch.save(ckpt, folder / "ckpt.pt")
    return folder / "ckpt.pt", offsets, raw


def refuse_to_fit(*args, **kwargs):
    raise AssertionError("offsets were fitted during evaluation: eval.py must apply the checkpoint's offsets only")


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def argmax_label(row, labels, offsets=None) -> str:
    shifted = np.array([row["scores"][label] for label in labels]) + (0 if offsets is None else offsets)
    return labels[int(shifted.argmax())]


def test_no_calibration_gives_the_raw_argmax(planted, run, monkeypatch):
    """--no-calibration on a checkpoint whose offsets move predictions: every prediction is the raw argmax."""
    path, offsets, _ = planted
    monkeypatch.setattr(ev, "fit_label_bias", refuse_to_fit)
    ev.main([str(path), "--data-dir", str(run["data"]), "--no-calibration"])
    rows = read_rows(path.parent / "eval-test-uncalibrated")
    assert len(rows) == 24
    assert all(r["pred"] == argmax_label(r, MELD) for r in rows)
    assert any(r["pred"] != argmax_label(r, MELD, offsets) for r in rows)  # the offsets would have mattered
    m = json.loads((path.parent / "eval-test-uncalibrated" / "metrics.json").read_text())
    assert m["calibrated"] is False
    assert m["meld"]["weighted_f1"] == m["uncalibrated_weighted_f1"]["meld"] == pytest.approx(
        f1_score([r["gold"] for r in rows], [r["pred"] for r in rows], labels=MELD, average="weighted",
                 zero_division=0), abs=1e-12)


def test_eval_applies_the_checkpoint_offsets_unchanged_to_test(planted, run, monkeypatch):
    path, offsets, raw = planted
    monkeypatch.setattr(ev, "fit_label_bias", refuse_to_fit)  # eval must never fit on test
    ev.main([str(path), "--data-dir", str(run["data"])])
    rows = read_rows(path.parent / "eval-test")
    assert [(r["dialogue_id"], r["utterance_id"]) for r in rows] == [(r["dialogue_id"], r["utterance_id"])
                                                                     for r in raw]
    for r, plain in zip(rows, raw):
        assert r["scores"] == pytest.approx(plain["scores"], abs=1e-6)
        assert r["pred"] == argmax_label(r, MELD, offsets), (r, offsets)
    changed = sum(r["pred"] != plain["pred"] for r, plain in zip(rows, raw))
    assert changed >= 1  # the planted offsets move predictions, so ignoring them fails the test
    m = json.loads((path.parent / "eval-test" / "metrics.json").read_text())
    gold = [r["gold"] for r in rows]
    assert m["calibrated"] is True
    assert m["meld"]["weighted_f1"] == pytest.approx(
        f1_score(gold, [r["pred"] for r in rows], labels=MELD, average="weighted", zero_division=0), abs=1e-12)
    assert m["uncalibrated_weighted_f1"]["meld"] == pytest.approx(
        f1_score(gold, [r["pred"] for r in raw], labels=MELD, average="weighted", zero_division=0), abs=1e-12)


# ---------------------------------------------------------------- the best checkpoint

def test_ckpt_pt_holds_the_first_step_with_the_best_dev_score(run, tmp_path, monkeypatch):
    """Dev scores planted step by step (0.30, 0.50, 0.50, 0.40): ckpt.pt must hold step 2 with step 2's offsets
    and dev metrics (a tie keeps the earlier step), ckpt_last.pt step 4 with the best score so far."""
    planted_f1 = [0.30, 0.50, 0.50, 0.40]
    calls = []

    def evaluate_dev(model, tok, dev, run, names, batch):
        f1 = planted_f1[len(calls)]
        calls.append(len(dev))
        res = dict(weighted_f1=f1, accuracy=f1 / 2, uncalibrated_weighted_f1=f1 / 3)
        return res, {"meld": [float(len(calls))] * 7}
    monkeypatch.setattr(train, "evaluate_dev", evaluate_dev)
    out = tmp_path / "run"
    train.main(train_argv(run["folder"], run["data"], out, "--max-steps", "4", "--eval-every", "1"))
    assert calls == [24] * 4
    best, last = (torch.load(out / name, weights_only=True) for name in ("ckpt.pt", "ckpt_last.pt"))
    assert (best["step"], best["best"], best["label_bias"]) == (2, 0.50, {"meld": [2.0] * 7})
    assert best["dev"]["weighted_f1"] == 0.50 and best["dev"]["uncalibrated_weighted_f1"] == pytest.approx(0.5 / 3)
    assert (last["step"], last["best"]) == (4, 0.50)
    logged = [json.loads(line)["dev_weighted_f1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == planted_f1


# ---------------------------------------------------------------- --data all

def make_emorynlp(data_dir: Path, n_scenes=4, n_utterances=4, seed=0) -> Path:
    """A small synthetic EmoryNLP (COSMIC-style CSVs) under data_dir/emorynlp."""
    rng = random.Random(seed)
    words = "we were on a break could i be any more tired how you doin".split()
    (data_dir / "emorynlp").mkdir(parents=True, exist_ok=True)
    for split in data.SPLITS:
        lines = ["Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode"]
        for scene in range(1, n_scenes + 1):
            for u in range(1, n_utterances + 1):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
                lines.append(f"{text},\"['Speaker{u % 2}']\",{rng.choice(EMORY)},{scene},{u},1,1")
        (data_dir / "emorynlp" / convert.EMORY_FILE.format(split)).write_text("\n".join(lines) + "\n")
    return data_dir


def test_data_all_keeps_labels_and_offsets_per_dataset_and_reports_the_union(run, tmp_path, monkeypatch):
    data_dir = make_emorynlp(make_meld(tmp_path / "data", n_dialogues=4, n_utterances=4))
    fits, fit = [], ev.fit_label_bias

    def recording(scores, y_true, labels, *args, **kwargs):
        fits.append((list(labels), fit(scores, y_true, labels, *args, **kwargs)))
        return fits[-1][1]
    monkeypatch.setattr(ev, "fit_label_bias", recording)
    out = tmp_path / "run"
    train.main(train_argv(run["folder"], data_dir, out, "--data", "all", "--max-steps", "1"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["labels"] == {"meld": MELD, "emorynlp": EMORY}
    fitted = {tuple(labels): offsets.tolist() for labels, offsets in fits}  # one fit per dataset, own labels
    assert len(fits) == 2 and ckpt["label_bias"] == {"meld": fitted[tuple(MELD)], "emorynlp": fitted[tuple(EMORY)]}
    assert ckpt["dev"]["n"] == 32 and ckpt["dev"]["labels"] == sorted(set(MELD) | set(EMORY))  # the union

    planted = {"meld": np.linspace(-1, 1, 7), "emorynlp": np.linspace(1, -1, 7)}  # differ per dataset
    ckpt["label_bias"] = {name: b.tolist() for name, b in planted.items()}
    torch.save(ckpt, out / "ckpt.pt")
    monkeypatch.setattr(ev, "fit_label_bias", refuse_to_fit)
    ev.main([str(out / "ckpt.pt"), "--data-dir", str(data_dir)])
    rows = read_rows(out / "eval-test")
    m = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert Counter(r["dataset"] for r in rows) == {"meld": 16, "emorynlp": 16}
    for r in rows:
        labels = data.LABELS[r["dataset"]]
        assert list(r["scores"]) == labels and r["pred"] == argmax_label(r, labels, planted[r["dataset"]])
    union = sorted(set(MELD) | set(EMORY))
    assert set(m) >= {"meld", "emorynlp", "union"} and m["union"]["labels"] == union and m["union"]["n"] == 32
    for name, labels, subset in [("meld", MELD, "meld"), ("emorynlp", EMORY, "emorynlp"), ("union", union, None)]:
        picked = [r for r in rows if subset in (None, r["dataset"])]
        gold, pred = [r["gold"] for r in picked], [r["pred"] for r in picked]
        assert m[name]["weighted_f1"] == pytest.approx(
            f1_score(gold, pred, labels=labels, average="weighted", zero_division=0), abs=1e-12), name


# ---------------------------------------------------------------- --zero-shot and the video descriptions

def test_zero_shot_scores_with_the_base_model_and_its_window(run, tmp_path):
    ev.main(["--zero-shot", "--model", str(run["folder"]), "--window", "1", "--data-dir", str(run["data"]),
             "--out", str(tmp_path)])
    folder = tmp_path / f"eval-test-{run['folder'].name}-window1"
    rows = read_rows(folder)
    assert not json.loads((folder / "metrics.json").read_text())["calibrated"]  # no checkpoint, no offsets
    model, tok = llama.load(run["folder"])  # the base model, no adapter
    test = data.load_split("meld", "test", run["data"])
    for window, same in ((1, True), (0, False)):
        expect = ev.predict(model, tok, data.build_examples(test, window), data.MAX_LEN, progress=False)
        close = [r["scores"] == pytest.approx(e["scores"], abs=1e-5) for r, e in zip(rows, expect)
                 if r["utterance_id"] > 0]  # a dialogue's first utterance has no context under any window
        assert all(close) if same else not any(close), window  # window 1 was used, not the default 2 or 0
    assert all(r["pred"] == argmax_label(r, MELD) for r in rows)


def test_described_only_scores_each_described_utterance_with_and_without_it(planted, run, monkeypatch):
    path, offsets, raw = planted
    monkeypatch.setattr(ev, "fit_label_bias", refuse_to_fit)
    described = [(0, 1), (2, 3), (5, 0)]  # (dialogue, utterance) of MELD test
    records = path.parent / "desc.jsonl"
    records.write_text("".join(json.dumps(dict(dataset="meld", split="test", dialogue_id=d, utterance_id=u,
                                               description=f"Person {d} frowns and turns away.")) + "\n"
                               for d, u in described))
    ev.main([str(path), "--data-dir", str(run["data"]), "--descriptions", str(records), "--described-only"])
    folder = path.parent / "eval-test-descriptions-desc-described"
    rows = read_rows(folder)
    m = json.loads((folder / "metrics.json").read_text())
    assert sorted((r["dialogue_id"], r["utterance_id"]) for r in rows) == described and all(r["described"]
                                                                                            for r in rows)
    plain = {(r["dialogue_id"], r["utterance_id"]): r for r in raw}
    for r in rows:  # the description is in the prompt: every score moves
        assert all(abs(r["scores"][label] - plain[r["dialogue_id"], r["utterance_id"]]["scores"][label]) > 1e-4
                   for label in MELD)
        assert r["pred"] == argmax_label(r, MELD, offsets)
    cmp = m["described_utterances"]
    assert cmp["n"] == 3 and cmp["with_description"]["meld"]["n"] == cmp["without"]["meld"]["n"] == 3
    assert cmp["with_description"]["meld"]["weighted_f1"] == m["meld"]["weighted_f1"]
    # without: the same utterances scored with no description, under the same offsets
    without = [argmax_label(plain[key], MELD, offsets) for key in described]
    gold = [plain[key]["gold"] for key in described]
    assert cmp["without"]["meld"]["weighted_f1"] == pytest.approx(
        f1_score(gold, without, labels=MELD, average="weighted", zero_division=0), abs=1e-12)
    assert cmp["without"]["meld"]["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, without)]))


# ---------------------------------------------------------------- the evaluation folder names

@pytest.mark.parametrize("argv, trained, expect", [
    (["runs/a/ckpt.pt"], "meld", "runs/a/eval-test"),
    (["runs/a/ckpt.pt", "--data", "meld"], "meld", "runs/a/eval-test"),  # the trained data is no variant
    (["runs/a/ckpt.pt", "--split", "dev", "--data", "emorynlp", "--limit", "5"], "meld",
     "runs/a/eval-dev-emorynlp-limit5"),
    (["runs/a/ckpt.pt", "--data", "meld,emorynlp"], "meld", "runs/a/eval-test-meld+emorynlp"),
    (["runs/a/ckpt.pt", "--descriptions", "d/desc.jsonl", "--described-only", "--max-len", "256"], "meld",
     "runs/a/eval-test-descriptions-desc-described-len256"),
    (["runs/a/ckpt.pt", "--no-calibration"], "meld", "runs/a/eval-test-uncalibrated"),
    (["runs/a/ckpt.pt", "--generate", "--no-calibration"], "meld", "runs/a/eval-test-generate"),  # no offsets
    (["runs/a/ckpt_last.pt"], "meld", "runs/a/eval-test-ckpt_last"),
    (["runs/a/ckpt.pt", "--out", "elsewhere"], "meld", "elsewhere/eval-test"),
    (["--zero-shot", "--model", "default"], "meld", "runs/zero-shot/eval-test-default-window2"),
    (["--zero-shot", "--model", "/m/Llama-2-7b-hf", "--window", "0"], "meld",
     "runs/zero-shot/eval-test-Llama-2-7b-hf-window0"),
])
def test_results_dir_names_every_variant(argv, trained, expect):
    assert cli.results_dir(ev.parse_args(argv + ["--device", "cpu"]), trained) == Path(expect)


def test_offsets_of_one_dataset_are_not_claimed_for_another(capsys):
    """A checkpoint with EmoryNLP offsets scored on MELD too: only EmoryNLP's line shows an uncalibrated score,
    MELD's predictions stay the raw argmax, and the report names which datasets had offsets."""
    emory = data.LABELS["emorynlp"]
    rows = [dict(dataset="meld", gold=MELD[i % 7], pred=None, scores={label: float(j == i % 3) for j, label in
                                                                       enumerate(MELD)}) for i in range(14)]
    rows += [dict(dataset="emorynlp", gold=emory[i % 7], pred=None, scores={label: float(j == 0) for j, label in
                                                                             enumerate(emory)}) for i in range(14)]
    for r in rows:
        r["pred"] = max(r["scores"], key=r["scores"].get)
    raw = [r["pred"] for r in rows]
    bias = {"emorynlp": [0.0, 2.0, 0, 0, 0, 0, 0]}
    res, _ = ev.calibrated_report(rows, bias)  # reports; the rows given keep their raw predictions
    rows = ev.apply_offsets(rows, bias)  # the predictions evaluation writes
    assert res["calibrated_datasets"] == ["emorynlp"] and res["calibrated"] is True
    assert [r["pred"] for r in rows[:14]] == raw[:14]  # MELD: no offsets of its own, the raw argmax
    assert all(r["pred"] == emory[1] for r in rows[14:])  # EmoryNLP: its offset moved every prediction
    cli.show_results("", res, "test")
    lines = capsys.readouterr().out.splitlines()
    assert "without the dev-fitted label offsets" in next(line for line in lines if line.startswith("emorynlp"))
    assert "without the dev-fitted label offsets" not in next(line for line in lines if line.startswith("meld"))
