"""eval.py: metrics against scikit-learn, label scoring against independent full forwards, generate mode's
invalid answers, and the refusal of unsafe checkpoints."""
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

import cli
import convert
import data
import eval as ev
import llama
from helpers import make_checkpoint

LABELS = data.LABELS["meld"]


def sk_metrics(y_true, y_pred, labels):
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return dict(accuracy=accuracy_score(y_true, y_pred),
                weighted_f1=f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
                macro_f1=f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
                precision=p, recall=r, f1=f, support=s, confusion=confusion_matrix(y_true, y_pred, labels=labels))


def check_against_sklearn(y_true, y_pred, labels, macro=True):
    ours, ref = ev.metrics(y_true, y_pred, labels), sk_metrics(y_true, y_pred, labels)
    assert ours["n"] == len(y_true)
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert ours["weighted_f1"] == pytest.approx(ref["weighted_f1"], abs=1e-12)
    if macro:
        assert ours["macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-12)
    for i, l in enumerate(labels):
        pc = ours["per_class"][l]
        assert [pc["precision"], pc["recall"], pc["f1"]] == pytest.approx(
            [ref["precision"][i], ref["recall"][i], ref["f1"][i]], abs=1e-12), l
        assert pc["support"] == ref["support"][i]
    assert np.array_equal(np.array(ours["confusion"]), ref["confusion"])
    assert ours["invalid"] == sum(p not in labels for p in y_pred)
    return ours


def random_case(seed, n=60):
    """Imbalanced gold labels; label 'fear' never in gold; 'disgust' never predicted; a few invalid answers."""
    rng = random.Random(seed)
    gold_pool = [l for l in LABELS if l != "fear"]
    y_true = rng.choices(gold_pool, weights=range(len(gold_pool), 0, -1), k=n)
    y_pred = [t if rng.random() < 0.5 else rng.choice(LABELS) for t in y_true]
    y_pred = [p if p != "disgust" else "neutral" for p in y_pred]
    for i in rng.sample(range(n), 3):
        y_pred[i] = rng.choice(["", "I think joy", "Neutral."])
    assert "fear" not in y_true and "disgust" not in y_pred and "disgust" in y_true
    return y_true, y_pred


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    y_true, y_pred = random_case(seed)
    ours = check_against_sklearn(y_true, y_pred, LABELS, macro=False)
    assert ours["invalid"] == 3
    # invalid answers are wrong: accuracy counts only exact label matches
    assert ours["accuracy"] == sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_when_every_class_occurs(seed):
    rng = random.Random(seed)
    y_true = LABELS + rng.choices(LABELS, k=40)
    y_pred = [t if rng.random() < 0.4 else rng.choice(LABELS + ["garbage"]) for t in y_true]
    check_against_sklearn(y_true, y_pred, LABELS)


def test_macro_f1_with_a_class_absent_from_gold_matches_sklearn():
    y_true, y_pred = random_case(0)
    check_against_sklearn(y_true, y_pred, LABELS)


def test_swapped_arguments_give_a_different_weighted_f1():
    """The trap: f1(y_pred, y_true) weights classes by prediction counts. A majority-class predictor on imbalanced
    gold looks fine with swapped arguments."""
    y_true = ["neutral"] * 6 + ["joy"] * 2 + ["anger"] * 2
    y_pred = ["neutral"] * 9 + ["joy"]
    right, swapped = ev.metrics(y_true, y_pred, LABELS), ev.metrics(y_pred, y_true, LABELS)
    assert right["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert swapped["weighted_f1"] == pytest.approx(f1_score(y_pred, y_true, average="weighted", zero_division=0))
    assert abs(right["weighted_f1"] - swapped["weighted_f1"]) > 0.05


def test_metrics_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 items"):
        ev.metrics(["joy"] * 3, ["joy"] * 2, LABELS)


# ---------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_models):
    """(our model, tok512 tokenizer) from a random HF checkpoint."""
    folder = tmp_path_factory.mktemp("tiny")
    make_checkpoint(folder, shared_models, std=0.3)
    return llama.load(folder)


def examples(labels=LABELS, n=7):
    """Synthetic dialogues of different lengths (no data files needed) turned into examples."""
    rng = random.Random(0)
    words = "oh my god what are you doing here yeah right no way i love it okay".split()
    dialogue = [dict(dataset="meld", split="test", dialogue_id=1, utterance_id=i, speaker=rng.choice(["Ross", "Joey"]),
                     text=" ".join(rng.choices(words, k=rng.randint(1, 12))), label=rng.choice(labels))
                for i in range(n)]
    exs = data.build_examples([dialogue], window=2)
    for e in exs:  # another label set: the prompt lists it too
        e["labels"] = list(labels)  # data.prompt_of writes the new labels into the prompt
    return exs


def reference_scores(model, tok, ex, max_len):
    """log P(candidate | prompt) of every label by one full forward of prompt + candidate, no cache, no batching."""
    prompt = tok.encode(data.prompt_of(ex), bos=True)
    assert len(prompt) + 20 < max_len  # nothing truncated
    ids = data.label_token_ids(tok, ex["labels"])
    prefix = any(a != b and b[:len(a)] == a for a in ids.values() for b in ids.values())
    out = {}
    for label in ex["labels"]:
        cand = ids[label] + [tok.eos_id] * prefix
        with torch.no_grad():
            logp = model(torch.tensor([prompt + cand])).log_softmax(-1)[0]
        out[label] = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cand))
    return out


@pytest.mark.parametrize("labels", [LABELS, ["sad", "sadness", "joy"]], ids=["meld", "prefix_labels"])
def test_score_mode_picks_highest_log_probability(tiny, labels):
    model, tok = tiny
    exs = examples(labels)
    rows = ev.predict(model, tok, exs, max_len=400, batch_size=4, progress=False)  # batches of unequal lengths
    assert len({len(tok.encode(data.prompt_of(e))) for e in exs}) > 1
    for ex, row in zip(exs, rows):
        ref = reference_scores(model, tok, ex, 400)
        assert (row["dialogue_id"], row["utterance_id"], row["gold"]) == (ex["dialogue_id"], ex["utterance_id"],
                                                                         ex["label"])
        assert row["pred"] in labels and list(row["scores"]) == labels
        assert row["scores"] == pytest.approx(ref, abs=1e-4)
        assert row["pred"] == max(ref, key=ref.get)
    assert any(max(r["scores"].values()) - min(r["scores"].values()) > 1.0 for r in rows)  # scores not all equal


def test_shared_header_scores_real_meld_dev_as_full_forwards(tiny, data_dir):
    """predict computes the header of MELD's prompts once; every score still equals a full forward's."""
    model, tok = tiny
    exs = random.Random(1).sample(data.build_examples(data.load_split("meld", "dev", data_dir), 2), 24)
    prompts = [ev.prompt_ids(tok, ex, 1024) for ex in exs]
    P = ev.header_length(prompts)
    assert P >= 20 and all(p[:P] == prompts[0][:P] for p in prompts)  # BOS, the task line and the labels
    rows = ev.predict(model, tok, exs, max_len=1024, batch_size=8, progress=False)
    for ex, row in zip(exs, rows):
        ref = reference_scores(model, tok, ex, 1024)
        assert row["scores"] == pytest.approx(ref, abs=1e-4)
        assert row["pred"] == max(ref, key=ref.get)


def test_gold_label_changes_no_prompt(tiny):
    """At the edge of max_len, two examples that differ only in their gold label get the same prompt ids and the
    same scores: evaluation keeps room for the longest label, whatever the answer."""
    model, tok = tiny
    ex = examples(n=4)[-1]
    answer = {label: len(ids) + 1 for label, ids in data.label_token_ids(tok, LABELS).items()}  # + EOS
    shortest, longest = min(answer, key=answer.get), max(answer, key=answer.get)
    assert answer[shortest] < answer[longest] and ex["context"]  # else the test could not fail
    full = len(tok.encode(data.prompt_of(ex), bos=True))
    max_len = full + answer[shortest]  # the whole context fits beside the shortest label, not the longest
    short, long = dict(ex, label=shortest), dict(ex, label=longest)
    assert ev.prompt_ids(tok, short, max_len) == ev.prompt_ids(tok, long, max_len)
    assert len(ev.prompt_ids(tok, short, max_len)) < full  # context was cut, for both
    rows = ev.predict(model, tok, [short, long], max_len, progress=False)
    assert rows[0]["scores"] == rows[1]["scores"]


def cache_bytes_seen(model, run) -> int:
    """The most bytes of cached keys and values any attention layer is handed while `run()` scores."""
    seen = [0]

    def record(module, args):
        past_k, past_v = args[4:6] if len(args) >= 6 else (None, None)
        if past_k is not None:
            seen[0] = max(seen[0], past_k.numel() * past_k.element_size() * 2)
    hooks = [layer.attention.register_forward_pre_hook(record) for layer in model.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen[0]


def test_scoring_cache_bytes_do_not_grow_with_the_number_of_candidates(tiny):
    """Multi-token candidates attend to the prompt's cache side by side: 2 or 12 candidates, the same cache."""
    model, tok = tiny
    prompts = [tok.encode(data.prompt_of(e), bos=True) for e in examples(n=3)]
    words = "sad sadness joy anger surprise neutral fear disgust happy excited frustrated calm".split()
    cands = [tok.encode(w) + [tok.eos_id] for w in words]
    assert min(map(len, cands)) >= 2  # every candidate runs tokens after the prompt
    few = cache_bytes_seen(model, lambda: llama.score_continuations(model, prompts, cands[:2], tok.pad_id))
    many = cache_bytes_seen(model, lambda: llama.score_continuations(model, prompts, cands, tok.pad_id))
    assert few > 0 and many == few


def test_generate_mode_counts_invalid_answers(tiny):
    model, tok = tiny
    exs = examples()
    rows = ev.predict(model, tok, exs, max_len=400, generate=True, progress=False)
    for ex, row in zip(exs, rows):
        ids = tok.encode(data.prompt_of(ex), bos=True)
        new = []
        with torch.no_grad():
            for _ in range(8):  # greedy decoding by full forwards, written out independently
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_id:
                    break
        answer = tok.decode(new).strip()
        assert row["pred"] == next((l for l in LABELS if l == answer.lower()), answer)
        assert row["scores"] is None
    m = ev.metrics([r["gold"] for r in rows], [r["pred"] for r in rows], LABELS)
    invalid = [r["pred"] for r in rows if r["pred"] not in LABELS]
    assert m["invalid"] == len(invalid) > 0  # a random model names no label, and that is never replaced
    assert m["accuracy"] <= (len(rows) - len(invalid)) / len(rows)


class Payload:
    """Any class: pickling it into a checkpoint is what weights_only loading refuses."""


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"config": {"model": "x"}, "lora": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: refused: it holds Python objects"):
        ev.load_checkpoint(path)


def test_apply_offsets_leaves_datasets_without_offsets_alone():
    # A MELD-trained checkpoint evaluated on EmoryNLP: its offsets are for MELD only.
    emory = data.LABELS["emorynlp"]
    rows = [dict(dataset="emorynlp", gold="sad", pred="sad", scores={l: float(i == 6) for i, l in enumerate(emory)}),
            dict(dataset="meld", gold="joy", pred="neutral", scores={l: float(i == 0) for i, l in enumerate(LABELS)})]
    rows = ev.apply_offsets(rows, {"meld": [0.0, 0, 0, 0, 5.0, 0, 0]})
    assert [r["pred"] for r in rows] == ["sad", "joy"]


def test_per_class_table_and_confusion_matrix_are_printed(capsys):
    labels = ["neutral", "surprise", "joy"]
    m = ev.metrics(["joy", "neutral", "neutral", "surprise"], ["joy", "joy", "neutral", "neutral"], labels)
    cli.show_classes(m)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["precision", "recall", "F1", "support"]
    assert lines[1].split() == ["neutral", "50.00", "50.00", "50.00", "2"]
    assert lines[4].split()[-3:] == labels[:3]  # gold / predicted header
    assert [line.split()[1:] for line in lines[5:8]] == [["1", "0", "1"], ["1", "0", "0"], ["0", "0", "1"]]


def test_bfloat16_eval_scores_the_model_dev_chose(tmp_path, shared_models):
    """A bfloat16 run: eval's model (load_checkpoint keeps the adapter unmerged in bf16) gives exactly the scores
    train.evaluate_dev's model gives for the same checkpoint; merging into bf16 weights would round the update."""
    import train
    from helpers import make_meld
    make_checkpoint(tmp_path / "model", shared_models)
    make_meld(tmp_path / "data", n_dialogues=4)
    argv = ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "3",
            "--lr", "1e-2", "--warmup", "1", "--window", "1", "--r", "4", "--lora-alpha", "8"]
    train.main(argv)
    ckpt_path = tmp_path / "run" / "ckpt.pt"
    cfg, _ = train.parse_config(argv)
    trained, tok, _ = train.load_model(cfg, log=lambda *_: None)  # the model as train.evaluate_dev holds it
    convert.load_adapter(trained, torch.load(ckpt_path, weights_only=True)["lora"], ckpt_path)
    dev = data.build_examples(data.load_split("meld", "dev", tmp_path / "data"), 1)
    expect = ev.predict(trained.eval(), tok, dev, 256, progress=False)
    model, _, _ = ev.load_checkpoint(ckpt_path, dtype=torch.bfloat16)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert [r["scores"] for r in ev.predict(model, tok, dev, 256, progress=False)] == [r["scores"] for r in expect]
    merged, _, _ = ev.load_checkpoint(ckpt_path, dtype=torch.bfloat16, merge=True)
    diff = max(abs(a["scores"][k] - b["scores"][k]) for a, b in
               zip(ev.predict(merged, tok, dev, 256, progress=False), expect) for k in a["scores"])
    assert diff > 1e-3  # the rounding the unmerged model avoids
