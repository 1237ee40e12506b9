"""lora.py against the LoRA definition (Hu et al. 2021) and against peft's implementation (test-only reference)."""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import llama
import lora
from conftest import need_module
from helpers import make_checkpoint, maxdiff, tiny_model

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tokens(B=2, T=17, seed=1):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, lora.LoRALinear)]


def randomize_b(model, seed=2, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))


@torch.no_grad()
def test_fresh_adapter_is_identity():
    model = tiny_model()
    x = tokens()
    ref = model(x)
    lora.apply_lora(model, ("wq", "wv", "w2"), r=4, lora_alpha=12, verbose=False)
    assert torch.equal(model(x), ref)
    layers = lora_layers(model)
    assert len(layers) == 3 * model.args.n_layers
    for m in layers:
        out_f, in_f = m.weight.shape
        assert m.lora_A.shape == (4, in_f) and m.lora_B.shape == (out_f, 4)
        assert m.lora_A.abs().sum() > 0 and torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
        assert m.scale == 12 / 4
    wq = model.layers[0].attention.wq
    assert wq.weight.shape == (model.args.n_heads * model.args.head_dim, model.args.dim)
    assert wq.lora_A.shape[1] == model.args.dim  # A: (r, in), B: (out, r), not transposed


@torch.no_grad()
def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, ALL, r=4, lora_alpha=7, verbose=False)  # scale 1.75, not 1 or 2
    randomize_b(model)
    x = tokens()
    unmerged = model(x)
    assert maxdiff(unmerged, tiny_model()(x)) > 1e-2  # the update is not negligible
    m = model.layers[1].feed_forward.w2
    expect = m.weight + (m.lora_B @ m.lora_A) * 7 / 4  # the definition, written out here
    lora.merge_all(model)
    assert maxdiff(m.weight, expect) <= 1e-6
    merged = model(x)
    assert maxdiff(merged, unmerged) <= 1e-5
    lora.merge_all(model)  # a second merge is a no-op
    assert maxdiff(model(x), unmerged) <= 1e-5
    lora.merge_all(model, merge=False)
    for k, v in model.state_dict().items():
        if k in base:
            assert maxdiff(v, base[k]) <= 1e-6, k
    assert maxdiff(model(x), unmerged) <= 1e-5


@torch.no_grad()
def test_merge_in_float32_on_bf16_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    w0 = lin.weight.clone()
    m = lora.LoRALinear(lin, r=8, lora_alpha=3)
    m.lora_B.copy_(1e-3 * torch.randn_like(m.lora_B))  # small updates: a bf16 merge would round many away
    expect = (w0.float() + (m.lora_B @ m.lora_A) * 3 / 8).to(torch.bfloat16)
    bf16_merge = w0 + ((m.lora_B @ m.lora_A) * 3 / 8).to(torch.bfloat16)
    assert not torch.equal(expect, bf16_merge)  # the test can tell the two apart
    m.merge()
    assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, expect)


def test_only_lora_gets_gradients(capsys):
    model = tiny_model().train()
    lora.apply_lora(model, ("wq", "wk", "w3"), r=2, lora_alpha=4)
    printed = capsys.readouterr().out
    randomize_b(model)
    model(tokens()).logsumexp(-1).mean().backward()
    n_lora = 0
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            n_lora += p.numel()
        else:
            assert not p.requires_grad and p.grad is None, name
    expect = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model))
    assert n_lora == expect
    counts = [int(s.replace(",", "")) for s in re.findall(r"([\d,]+) trainable of ([\d,]+)", printed)[0]]
    assert counts == [expect, sum(p.numel() for p in model.parameters())]


@torch.no_grad()
def test_matches_peft(tmp_path, shared_models):
    peft = need_module("peft")
    hf = make_checkpoint(tmp_path, shared_models)
    model, _ = llama.load(tmp_path)
    r, alpha = 4, 10
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0)).eval()
    lora.apply_lora(model, ("wq", "wv"), r=r, lora_alpha=alpha, verbose=False)
    randomize_b(model)
    for i, layer in enumerate(model.layers):
        for ours, theirs in (("wq", "q_proj"), ("wv", "v_proj")):
            m, p = getattr(layer.attention, ours), getattr(ref.base_model.model.model.layers[i].self_attn, theirs)
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
            assert p.scaling["default"] == m.scale
    x = tokens()
    expect = ref(x).logits
    with ref.disable_adapter():
        assert maxdiff(ref(x).logits, expect) > 1e-2  # the adapter matters
    assert maxdiff(model(x), expect) <= 1e-5


def test_dropout_on_lora_branch_only():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=False)
    m = lora.LoRALinear(lin, r=4, lora_alpha=8, dropout=0.5).train()
    x = torch.randn(3, 5, 32)
    base = F.linear(x, lin.weight)
    assert torch.equal(m(x), base)  # B = 0: dropout must not touch the base path
    with torch.no_grad():
        m.lora_B.normal_()
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    kept = lora.drop(x, 0.5) != 0  # the same mask, drawn from the same generator state
    dropped = x * kept / 0.5  # peft's dropout: kept elements scaled by 1 / (1 - p)
    assert 0.3 < kept.float().mean() < 0.7
    assert maxdiff(y, base + dropped @ m.lora_A.T @ m.lora_B.T * 2) <= 1e-5
    assert maxdiff(m(x), y) > 0  # train mode draws new masks
    m.eval()
    with torch.no_grad():
        y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and maxdiff(y1, base + x @ m.lora_A.T @ m.lora_B.T * 2) <= 1e-5


def test_dropout_keeps_rate_p_and_the_expected_update():
    """lora.drop zeros a fraction p of its input (0.05, the recipes' rate) and does not rescale; the adapter divides
    its middle by 1 - p instead, so a training-mode update averages to the evaluation-mode one."""
    torch.manual_seed(0)
    x = torch.randn(2000, 200)
    dropped = lora.drop(x, 0.05)
    assert abs((dropped == 0).float().mean().item() - 0.05) < 0.002  # n = 400,000: std 3.4e-4
    assert torch.equal(dropped[dropped != 0], x[dropped != 0])  # kept elements unscaled
    m = lora.LoRALinear(nn.Linear(32, 24, bias=False), r=4, lora_alpha=8, dropout=0.05)
    with torch.no_grad():
        m.lora_B.normal_()
    row = torch.randn(1, 32).expand(20000, 32)  # one input, 20,000 dropout draws
    with torch.no_grad():
        trained, evaluated = m.train()(row).mean(0), m.eval()(row[:1])[0]
    base = F.linear(row[:1], m.weight)[0]
    assert maxdiff(trained - base, evaluated - base) <= 0.02 * (evaluated - base).abs().max()


def test_adapters_reading_one_input_share_one_dropout_mask():
    """wq, wk, wv share one mask of their input and w1, w3 one of theirs; wo and w2 read other tensors and draw
    their own; the rate stays p; the mask is released as soon as its last user has it."""
    model = tiny_model()
    lora.apply_lora(model, ALL, r=4, lora_alpha=8, dropout=0.5, verbose=False)
    model.train()
    shared = model.layers[0].attention.wq.dropout
    assert shared is model.layers[0].attention.wk.dropout and isinstance(shared, lora.SharedDropout)
    first = {}

    class Record(nn.Module):  # what one adapter's dropout hands it
        def __init__(self, inner, name):
            super().__init__()
            self.inner, self.name = inner, name

        def forward(self, x):
            return first.setdefault(self.name, self.inner(x))
    for name, m in model.layers[0].named_modules():
        if isinstance(m, lora.LoRALinear):
            m.dropout = Record(m.dropout, name.split(".")[-1])
    model(tokens()).sum().backward()
    assert first["wq"] is first["wk"] is first["wv"] and first["w1"] is first["w3"]
    assert first["wo"] is not first["wq"] and first["w2"] is not first["w1"]
    zeros = (first["wq"] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6  # rate 0.5
    assert shared.out is None and shared.calls == 0  # released by its third user, wv


def test_unknown_target_raises():
    model = tiny_model()
    with pytest.raises(cli.UserError, match=r"q_proj.*wq, wk, wv, wo, w1, w2, w3"):
        lora.apply_lora(model, ("wq", "q_proj"), verbose=False)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # refused before any change
    assert lora.TARGETS == ALL


HF_NAMES = {"wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
            "wo": ("self_attn", "o_proj"), "w1": ("mlp", "gate_proj"), "w3": ("mlp", "up_proj"),
            "w2": ("mlp", "down_proj")}


def test_one_adamw_step_matches_peft_on_all_seven_targets(tmp_path, shared_models):
    """Training, not only inference: the same next-token loss through our model and peft's (dropout 0, all seven
    targets, B non-zero so A gets gradients too) gives the same gradients of every A and B, and one AdamW step
    the same adapters, within float32 noise."""
    peft = need_module("peft")
    hf = make_checkpoint(tmp_path, shared_models)
    model, _ = llama.load(tmp_path)
    r, alpha = 4, 12
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[
        name for _, name in HF_NAMES.values()]))
    lora.apply_lora(model, ALL, r=r, lora_alpha=alpha, verbose=False)
    randomize_b(model, std=0.05)
    pairs = []  # (our LoRALinear, peft's lora layer)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for ours, (block, name) in HF_NAMES.items():
                m = getattr(layer.attention if block == "self_attn" else layer.feed_forward, ours)
                p = getattr(getattr(ref.base_model.model.model.layers[i], block), name)
                p.lora_A["default"].weight.copy_(m.lora_A)
                p.lora_B["default"].weight.copy_(m.lora_B)
                assert p.scaling["default"] == m.scale
                pairs.append((m, p))
    assert len(pairs) == 7 * len(model.layers)
    model.train()
    ref.train()
    x = tokens(B=2, T=24)
    F.cross_entropy(model(x)[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1)).backward()
    F.cross_entropy(ref(x).logits[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1)).backward()
    for m, p in pairs:
        for ours, theirs in ((m.lora_A, p.lora_A["default"].weight), (m.lora_B, p.lora_B["default"].weight)):
            assert ours.grad.norm() > 0
            assert ((ours.grad - theirs.grad).norm() / theirs.grad.norm()).item() <= 1e-5
    ours_params = [t for m, _ in pairs for t in (m.lora_A, m.lora_B)]
    theirs_params = [t for _, p in pairs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]
    assert {id(t) for t in theirs_params} == {id(t) for t in ref.parameters() if t.requires_grad}
    assert {id(t) for t in ours_params} == {id(t) for t in model.parameters() if t.requires_grad}
    before = [t.detach().clone() for t in ours_params]
    for params in (ours_params, theirs_params):
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        opt.step()
    for ours, theirs, old in zip(ours_params, theirs_params, before):
        assert maxdiff(ours, old) > 5e-4  # the step moved every tensor (about lr per element)
        assert maxdiff(ours, theirs) <= 1e-6


@pytest.mark.parametrize("in_features", [64, 96, 576])
def test_a_starts_kaiming_uniform_as_in_peft(in_features):
    """peft initialises A with kaiming_uniform_(a=sqrt(5)): uniform on +-1/sqrt(in_features). Ours, drawn many
    times over: within the bound, reaching near it, with the variance of that uniform; B starts at zero."""
    bound = 1 / math.sqrt(in_features)
    torch.manual_seed(0)
    a = torch.cat([lora.LoRALinear(nn.Linear(in_features, 32, bias=False), r=16, lora_alpha=16).lora_A.flatten()
                   for _ in range(20)])  # 320 x in_features draws
    assert a.abs().max() <= bound
    assert a.abs().max() >= 0.99 * bound  # a narrower init (e.g. a normal with small std) fails here
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform's std, not a normal's
    assert abs(a.mean().item()) <= 0.02 * bound
    peft = need_module("peft")
    torch.manual_seed(0)
    holder = peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=["lin"]),
                                          nn.ModuleDict({"lin": nn.Linear(in_features, 32, bias=False)}))
    theirs = holder["lin"].lora_A["default"].weight
    assert theirs.abs().max() <= bound and theirs.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
