"""train.py: answer-only loss masks, the lr schedule, length-grouped batches, gradient checkpointing and
accumulation, overfitting a tiny batch, and a 2-step end-to-end run whose checkpoint eval.py rebuilds."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import lora
import train
from helpers import make_checkpoint, make_meld, maxdiff, tiny_model

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def random_encoded(n, seed=0, eos=2):
    """n (ids, n_answer) pairs of different lengths and answer lengths, ending in EOS, like data.encode_example."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_answer = rng.randint(2, 6)
        out.append(([1] + [rng.randrange(3, 512) for _ in range(rng.randint(5, 30) + n_answer - 1)] + [eos], n_answer))
    return out


# ---------------------------------------------------------------- loss masks

def test_collate_marks_answer_positions_and_keeps_eos_when_pad_is_eos():
    eos = pad = 2
    encoded = [([1, 10, 11, 12, 40, 41, eos], 3), ([1, 20, 50, eos], 2), ([1, 30, 31, 32, 33, 60, eos], 2)]
    x, where, targets = train.collate(encoded, pad, "cpu")
    assert x.tolist() == [[1, 10, 11, 12, 40, 41, eos], [1, 20, 50, eos, pad, pad, pad], [1, 30, 31, 32, 33, 60, eos]]
    # position t is marked when token t + 1 is an answer token (label ids + EOS)
    assert where.tolist() == [[False, False, False, True, True, True, False],
                              [False, True, True, False, False, False, False],
                              [False, False, False, False, True, True, False]]
    assert targets.tolist() == [40, 41, eos, 50, eos, 60, eos]  # every real EOS is a target, no padding is


def test_collate_targets_are_label_ids_and_eos(tmp_path, shared_models):
    make_checkpoint(tmp_path, shared_models)
    tok = train.llama.load_tokenizer(tmp_path)
    assert tok.pad_id == tok.eos_id  # tok512 has no pad: the trap case
    exs = ev_examples()
    encoded = [data.encode_example(tok, e, 256) for e in exs]
    x, where, targets = train.collate(encoded, tok.pad_id, "cpu")
    expect = [t for e in exs for t in data.label_token_ids(tok, [e["label"]])[e["label"]] + [tok.eos_id]]
    assert targets.tolist() == expect
    assert where.sum() == sum(n for _, n in encoded)


def ev_examples(n=6):
    rng = random.Random(0)
    labels = data.LABELS["meld"]
    dialogue = [dict(dataset="meld", split="train", dialogue_id=3, utterance_id=i, speaker="Monica",
                     text="so " * rng.randint(1, 9) + "what", label=labels[i % len(labels)]) for i in range(n)]
    return data.build_examples([dialogue], window=2)


# ---------------------------------------------------------------- schedule and batches

def test_get_lr_warmup_and_cosine():
    lr, warmup, total = 1e-3, 10, 110
    assert train.get_lr(0, total, lr, warmup) == pytest.approx(1e-4)  # lr / warmup
    assert train.get_lr(4, total, lr, warmup) == pytest.approx(5e-4)  # linear
    assert train.get_lr(9, total, lr, warmup) == pytest.approx(1e-3)
    assert train.get_lr(10, total, lr, warmup) == pytest.approx(1e-3)  # peak at step warmup
    # cosine from lr to lr/10 over 100 steps: lr * (0.1 + 0.45 * (1 + cos(pi * progress)))
    assert train.get_lr(35, total, lr, warmup) == pytest.approx(1e-3 * (0.1 + 0.45 * 1.7071067811865475))
    assert train.get_lr(60, total, lr, warmup) == pytest.approx(0.55e-3)
    assert train.get_lr(85, total, lr, warmup) == pytest.approx(1e-3 * (0.1 + 0.45 * 0.2928932188134524))
    assert train.get_lr(110, total, lr, warmup) == pytest.approx(1e-4)
    lrs = [train.get_lr(s, total, lr, warmup) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def pad_fraction(batches, lengths):
    return sum(1 - sum(lengths[i] for i in b) / (len(b) * max(lengths[i] for i in b)) for b in batches) / len(batches)


def test_make_batches_cover_once_deterministic_and_length_grouped():
    rng = random.Random(0)
    lengths = [rng.randint(20, 256) for _ in range(1001)]
    batches = train.make_batches(lengths, 8, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(b) == 8 for b in batches[:-1]) or sum(len(b) < 8 for b in batches) == 1
    assert batches == train.make_batches(lengths, 8, seed=3)
    assert batches != train.make_batches(lengths, 8, seed=4)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[s:s + 8] for s in range(0, len(shuffled), 8)]
    grouped, rand = pad_fraction(batches, lengths), pad_fraction(random_batches, lengths)
    assert grouped < 0.2 * rand, (grouped, rand)
    firsts = [min(b) for b in batches[:20]]
    assert firsts != sorted(firsts)  # the batches themselves are shuffled


# ---------------------------------------------------------------- gradients

def lora_model(targets=ALL, r=4, seed=0, dropout=0.0):
    model = tiny_model(seed)
    lora.apply_lora(model, targets, r=r, lora_alpha=2 * r, dropout=dropout, verbose=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # so A gets gradients too
    return model.train()


def step_loss(model, encoded, n_answer):
    """The loss exactly as train.main computes it for one micro-batch."""
    x, where, targets = train.collate(encoded, 2, "cpu")
    return train.answer_loss(model, x, where, targets) / n_answer


def checkpointed_step(model, blocks, x, where, targets, forward):
    """(loss, LoRA gradients) of one micro-batch with the first `blocks` blocks checkpointed; the RNG is seeded as
    train.seed_dropout seeds it, so every run draws the same dropout masks."""
    model.zero_grad(set_to_none=True)
    model.checkpointing = blocks
    torch.manual_seed(1234)
    loss = F.cross_entropy(forward(model, x, where), targets, reduction="sum")
    loss.backward()
    return loss.item(), lora_grads(model)


@pytest.mark.parametrize("forward", ["plain", "shared"])
def test_gradient_checkpointing_never_changes_training(forward):
    """With LoRA dropout on (0.05, the recipes' rate), checkpointing no block, the first one, or all of them gives
    the same loss and the same LoRA gradients (float32, 1e-6 relative), through the plain forward and through the
    shared-header forward train.py uses. The frozen embedding is the reentrant-checkpoint trap."""
    forward = {"plain": lambda m, x, w: m(x, logits_at=w), "shared": train.forward_shared}[forward]
    encoded = with_header(random_encoded(4, seed=2), header=[7, 8, 9, 10, 11, 12])
    x, where, targets = train.collate(encoded, 2, "cpu")
    model = lora_model(dropout=0.05)
    assert not model.tok_embeddings.weight.requires_grad
    loss, grads = checkpointed_step(model, 0, x, where, targets, forward)
    assert len(grads) == 2 * len(ALL) * model.args.n_layers
    for blocks in (1, model.args.n_layers):
        ckpt_loss, ckpt_grads = checkpointed_step(model, blocks, x, where, targets, forward)
        assert abs(ckpt_loss - loss) <= 1e-6 * abs(loss), blocks
        for n in grads:
            assert grads[n].norm() > 0, n
            assert rel_diff(ckpt_grads[n], grads[n]) <= 1e-6, (blocks, n)


def test_dropout_masks_change_the_gradients():
    """The check above can fail: another dropout draw changes the gradients far beyond its tolerance."""
    encoded = with_header(random_encoded(4, seed=2), header=[7, 8, 9, 10, 11, 12])
    x, where, targets = train.collate(encoded, 2, "cpu")
    model = lora_model(dropout=0.05)
    forward = lambda m, x, w: m(x, logits_at=w)  # noqa: E731
    _, grads = checkpointed_step(model, 0, x, where, targets, forward)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(99)  # other masks
    F.cross_entropy(forward(model, x, where), targets, reduction="sum").backward()
    other = lora_grads(model)
    assert max(rel_diff(other[n], grads[n]) for n in grads) > 1e-3


def with_header(encoded, header):
    """The rows of `encoded` behind one shared header of token ids, as every instruction of a dataset starts."""
    return [([ids[0]] + header + ids[1:], n) for ids, n in encoded]


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_shared_prefix_same_loss_and_gradients(blocks):
    """forward_shared runs the rows' common prefix once as one row; the loss and every LoRA gradient equal those of
    the unshared batch (float32, grouped-query attention, checkpointing none, some or all blocks, dropout 0)."""
    encoded = with_header(random_encoded(5, seed=3), header=[7, 8, 9, 10, 11, 12, 13, 14])
    x, where, targets = train.collate(encoded, 2, "cpu")
    assert train.shared_length(x, where) >= 9  # BOS + the header, and no loss position inside it
    model = lora_model()
    assert model.args.n_kv_heads < model.args.n_heads
    model.checkpointing = blocks
    plain = train.answer_loss(model, x, where, targets)  # the reference: the paper's loss, plainly
    plain.backward()
    plain_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    shared = F.cross_entropy(train.forward_shared(model, x, where), targets, reduction="sum")
    shared.backward()
    shared_grads = lora_grads(model)
    assert abs(shared.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for n in plain_grads:
        assert plain_grads[n].norm() > 0, n
        assert rel_diff(shared_grads[n], plain_grads[n]) <= 1e-5, n


def test_shared_length_stops_before_the_first_loss_position():
    encoded = [([1, 5, 6, 40, 2], 2), ([1, 5, 6, 40, 41, 2], 2)]  # rows agree up to 40, where row 0's answer begins
    x, where, _ = train.collate(encoded, 2, "cpu")
    assert train.shared_length(x, where) == 2  # position 2 predicts row 0's first answer token
    x, where, _ = train.collate([([1, 5, 6, 2], 1), ([4, 5, 6, 2], 1)], 2, "cpu")
    assert train.shared_length(x, where) == 0  # the first tokens differ


def test_gradient_accumulation_equals_one_batch():
    encoded = random_encoded(4, seed=1)
    n_answer = sum(n for _, n in encoded)
    model = lora_model()
    big = step_loss(model, encoded, n_answer)
    big.backward()
    one = lora_grads(model)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for micro in (encoded[:2], encoded[2:]):  # normalised by the whole step's answer tokens, as train.main does
        loss = step_loss(model, micro, n_answer)
        loss.backward()
        total += loss.item()
    acc = lora_grads(model)
    for n in one:
        assert maxdiff(acc[n], one[n]) <= 1e-6, n
    # and the loss is the mean over answer tokens of -log p, each sequence run alone without padding
    with torch.no_grad():
        ref = 0.0
        for ids, k in encoded:
            logp = model(torch.tensor([ids])).log_softmax(-1)[0]
            ref -= sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - k, len(ids)))
    assert total == pytest.approx(ref / n_answer, abs=1e-5) and big.item() == pytest.approx(ref / n_answer, abs=1e-5)


def test_tiny_model_overfits_real_meld_prompts(tmp_path, shared_models, data_dir):
    make_checkpoint(tmp_path, shared_models)
    tok = train.llama.load_tokenizer(tmp_path)
    exs = data.build_examples(data.load_split("meld", "dev", data_dir), window=1)
    exs = random.Random(0).sample(exs, 16)
    assert len({e["label"] for e in exs}) >= 3
    encoded = [data.encode_example(tok, e, 256) for e in exs]
    n_answer = sum(n for _, n in encoded)
    model = tiny_model(seed=1)
    with torch.no_grad():  # the frozen head bounds the logit margin: widen it so near-zero loss is reachable
        model.output.weight.mul_(4)
    lora.apply_lora(model, ALL, r=16, lora_alpha=16, verbose=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = step_loss(model, encoded, n_answer)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.05, losses[::10] + losses[-1:]


# ---------------------------------------------------------------- end to end

HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
      "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


class Clock:
    """A stand-in for train's `time` module whose time() advances exactly one second per call."""
    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1.0
        return self.now


def test_main_end_to_end_and_checkpoint_reload(tmp_path, shared_models, data_dir, monkeypatch):
    folder, out = tmp_path / "model", tmp_path / "run"
    hf = make_checkpoint(folder, shared_models)
    argv = ["--model", str(folder), "--data", "meld", "--data-dir", str(data_dir), "--max-steps", "2",
            "--dev-limit", "8", "--out", str(out), "--batch-size", "2", "--grad-accum", "2", "--window", "1",
            "--warmup", "1", "--lr", "1e-2", "--max-len", "1024", "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(train, "time", Clock())  # t0, then one call per step: 1 s per step exactly
    train.main(argv)
    assert (out / "ckpt.pt").exists() and (out / "ckpt_last.pt").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(1e-2)  # warmup 1: step 0 at the peak
    # The logged loss and throughput, recomputed from the run's own batches: step 1's loss is the base model's
    # (a fresh adapter has B = 0), computed by transformers one sequence at a time; tokens_per_s counts every
    # row's prompt and answer over the (fake) seconds.
    cfg, _ = train.parse_config(argv)
    tok = train.llama.load_tokenizer(folder)
    _, _, encoded, _, _ = train.load_data(cfg, tok, log=lambda *_: None)
    batches = train.make_batches([len(ids) for ids, _ in encoded], 2, seed=0)
    steps = [[encoded[i] for b in batches[k * 2:(k + 1) * 2] for i in b] for k in range(2)]
    with torch.no_grad():
        nll = sum(-hf(torch.tensor([ids])).logits[0].log_softmax(-1)[len(ids) - n - 1 + t, ids[len(ids) - n + t]]
                  for ids, n in steps[0] for t in range(n))
    assert rows[0]["loss"] == pytest.approx(nll.item() / sum(n for _, n in steps[0]), rel=1e-5)
    tokens = [sum(len(ids) for ids, _ in step) for step in steps]
    assert [r["tokens_per_s"] for r in rows] == [tokens[0], round((tokens[0] + tokens[1]) / 2, 1)]
    assert not any(f.suffix == ".tmp" for f in out.iterdir())

    model, tok, ckpt = ev.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["r"] == 16
    assert rows[-1]["dev_weighted_f1"] == ckpt["dev"]["weighted_f1"] == ckpt["best"]  # the one dev evaluation
    assert ckpt["dev"]["n"] == 8 and len(ckpt["label_bias"]["meld"]) == 7  # (the offsets: test_offsets.py)
    for name, broken, says in [
            ("shape.pt", dict(ckpt, lora={k: v[:, :3] for k, v in ckpt["lora"].items()}), "adapter does not fit"),
            ("args.pt", dict(ckpt, model_args=dict(ckpt["model_args"], n_layers=99)), "trained on a model with")]:
        torch.save(broken, out / name)  # an adapter or model description that does not fit the base model
        with pytest.raises(ValueError, match=rf"{name}: {says}"):
            ev.load_checkpoint(out / name)
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == 2
    # reference: the transformers model with B A * lora_alpha / r added to its weights, from the saved tensors
    scale = ckpt["config"]["lora_alpha"] / ckpt["config"]["r"]
    params = dict(hf.named_parameters())
    n = 0
    with torch.no_grad():
        for key, a in ckpt["lora"].items():
            if key.endswith(".lora_A"):
                _, i, _, name, _ = key.split(".")
                delta = (ckpt["lora"][key[:-1] + "B"] @ a) * scale
                n += delta.abs().max() > 0
                params[f"model.layers.{i}.{HF[name]}.weight"].add_(delta)
    assert n == len(ALL) * hf.config.num_hidden_layers  # every adapter moved in 2 steps
    x = torch.tensor([tok.encode("Ross: We were on a break!\n### Response:\n", bos=True)])
    with torch.no_grad():
        assert maxdiff(model(x), hf(x).logits) <= 1e-4


# ---------------------------------------------------------------- precision: --dtype auto and the bf16 path

@pytest.mark.parametrize("flags,dtype", [({"fpu", "avx2", "avx512f"}, "float32"), ({"avx2", "amx_bf16"}, "bfloat16"),
                                         ({"avx512f", "avx512_bf16"}, "bfloat16"), (set(), "float32")])
def test_dtype_auto_follows_the_cpu_flags(monkeypatch, capsys, flags, dtype):
    """--dtype auto on the CPU is bfloat16 exactly where the CPU has bf16 units (AMX or AVX-512 BF16), says which
    and why; the CPU recipe's float32 and --dtype bfloat16 hold whatever the flags."""
    monkeypatch.setattr(train.cli, "cpu_flags", lambda: flags)
    cfg, _ = train.parse_config(["--device", "cpu", "--dtype", "auto"])
    assert cfg.dtype == dtype
    said = capsys.readouterr().out
    assert f"--dtype auto: {dtype}, as the CPU" in said
    assert ("natively" in said) == (dtype == "bfloat16")
    for forced in ("float32", "bfloat16", None):  # None: the recipe's float32
        cfg, _ = train.parse_config(["--device", "cpu"] + (["--dtype", forced] if forced else []))
        assert cfg.dtype == (forced or "float32")
        assert capsys.readouterr().out == ""


@pytest.mark.parametrize("dtype,expect", [("auto", "bfloat16"), (None, "float32"), ("float32", "float32")])
def test_evaluation_loads_the_dtype_the_run_trained_in(monkeypatch, dtype, expect):
    """A checkpoint's config dtype picks the evaluation dtype; `auto` is resolved as train.py resolves it (here on a
    host stubbed to have bf16 units); a config from before --dtype existed keeps float32 on CPU."""
    monkeypatch.setattr(train.cli, "cpu_flags", lambda: {"amx_bf16"})
    config = {} if dtype is None else dict(dtype=dtype)
    assert train.convert.trained_dtype(config, "cpu", "ckpt.pt") == expect
    with pytest.raises(ValueError, match="ckpt.pt: its config's dtype is 'float16'"):
        train.convert.trained_dtype(dict(dtype="float16"), "cpu", "ckpt.pt")


@pytest.mark.parametrize("recipe", ["cuda", "cpu-auto"])
def test_cuda_recipe_code_path_runs_on_cpu_in_bfloat16(tmp_path, shared_models, monkeypatch, recipe):
    """bf16 on the CPU: bf16 base weights under autocast, float32 LoRA and AdamW state; the loss stays finite and
    falls. "cuda": --dtype bfloat16 runs what a GPU runs (LoRA on wq, wv, every block checkpointed). "cpu-auto":
    the CPU recipe (all 7 targets, shared dropout masks, no checkpointing) with --dtype auto on a host stubbed to
    have bf16 units; the checkpoint stores the resolved dtype, and evaluation rebuilds the model in it."""
    monkeypatch.setattr(train.cli, "cpu_flags", lambda: {"avx512_bf16"})
    folder, out = tmp_path / "model", tmp_path / "run"
    make_checkpoint(folder, shared_models)
    make_meld(tmp_path / "data", 4, 4, label="joy")
    argv = ["--model", str(folder), "--data-dir", str(tmp_path / "data"), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "8", "--lr", "1e-2", "--warmup", "1",
            "--window", "1", "--dev-limit", "4", "--save-every", "1"]
    if recipe == "cuda":
        argv += ["--dtype", "bfloat16", "--grad-ckpt", "all", "--targets", "wq,wv", "--r", "8", "--lora-alpha", "64"]
    else:
        argv += ["--dtype", "auto"]
    cfg, _ = train.parse_config(argv)
    model, _, opt = train.load_model(cfg, log=lambda *_: None)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 == model.layers[0].attention.wq.weight.dtype
    assert model.checkpointing == (model.args.n_layers if recipe == "cuda" else 0)
    train.main(argv)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses
    last = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert last["config"]["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in last["lora"].values())
    moments = [v for s in last["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    evaluated, _, _ = ev.load_checkpoint(out / "ckpt.pt")
    assert evaluated.layers[0].attention.wq.weight.dtype == torch.bfloat16


def test_grad_ckpt_flag_never_changes_a_run(tmp_path, shared_models):
    """From the command line, dropout 0.05 (the recipes' rate): --grad-ckpt none, 1 (some but not all of the 2
    blocks) and all log the same losses and save the same adapter (float32, 1e-6 relative)."""
    make_checkpoint(tmp_path / "model", shared_models)
    make_meld(tmp_path / "data", n_dialogues=4)
    runs = {}
    for blocks in ("none", "1", "all"):
        out = tmp_path / blocks
        train.main(["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--out", str(out),
                    "--device", "cpu", "--dtype", "float32", "--grad-ckpt", blocks, "--dropout", "0.05",
                    "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3", "--lr", "1e-2", "--warmup", "1",
                    "--window", "1", "--dev-limit", "4"])
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[blocks] = losses, torch.load(out / "ckpt_last.pt", weights_only=True)["lora"]
    losses, adapter = runs["none"]
    for blocks in ("1", "all"):
        other_losses, other = runs[blocks]
        assert other_losses == pytest.approx(losses, rel=1e-6), blocks
        for k in adapter:
            assert rel_diff(other[k], adapter[k]) <= 1e-6, (blocks, k)
