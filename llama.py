"""LLaMA-family decoder in plain PyTorch: model, KV cache, generation, label scoring, loading; the
tokenizers are in tokenizer.py.

Follows LLaMA (Touvron et al. 2023, arXiv 2302.13971, 2307.09288, section 2) and Meta's `model.py`:
pre-norm RMSNorm, rotary embedding (half-split, as the Hugging Face folders it loads), grouped-query
attention, SwiGLU. Shapes: B batch, T new tokens, S cached + new tokens, H heads, K kv heads, D
head_dim, C dim (the model width), V vocab_size; in label scoring M candidates (labels) of at most L
tokens after each prompt."""
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from tokenizer import FOLDER, Tokenizer, load_tokenizer  # noqa: F401 (callers use llama.load_tokenizer)

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    hidden_dim: int = 11008  # feed-forward width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_embeddings: bool = False
    max_seq_len: int = 4096

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """From HF config.json (rope: rope_theta + rope_scaling, or HF 5's rope_parameters)."""
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported (only 'llama3')")
        llama3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" and not set(llama3) <= set(scaling):
            raise ValueError(f"rope_scaling llama3 needs {', '.join(llama3)}; got {sorted(scaling)}")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {cfg.get('model_type')!r} with hidden_act {cfg.get('hidden_act')!r}; "
                             "LLaMA is model_type 'llama' with SwiGLU's 'silu'")
        n_heads = cfg["num_attention_heads"]
        if n_heads % (cfg.get("num_key_value_heads") or n_heads):
            raise ValueError(f"{n_heads} attention heads do not split into {cfg['num_key_value_heads']} kv groups")
        return cls(dim=cfg["hidden_size"], tie_embeddings=cfg.get("tie_word_embeddings", False),
                   n_layers=cfg["num_hidden_layers"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   n_heads=n_heads, head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads, hidden_dim=cfg["intermediate_size"],
                   vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 4096),
                   rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=scaling)

class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32 and cast back (LLaMA section 2.2; HF LlamaRMSNorm)."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return self.weight * (x32 * inv_rms).to(x.dtype)

def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32, Llama 3.1 scaled if configured (as HF computes them)."""
    exponents = torch.arange(0, args.head_dim, 2, device=device, dtype=torch.float32) / args.head_dim
    inv = 1.0 / args.rope_theta ** exponents
    s = args.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return inv
    old = s["original_max_position_embeddings"]  # the context length the model was pretrained at
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = torch.where(wavelen > old / lo, inv / s["factor"], inv)  # low frequencies / factor
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)  # between the two: a blend
    return torch.where(mid, (1 - smooth) * inv / s["factor"] + smooth * inv, scaled)

def apply_rope(x, cos, sin):
    """Rotate (B, H, T, D) by angles as cos/sin (B, 1, T, D/2); half-split pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

class KVCache:
    """Keys/values of earlier tokens per layer, k[i], v[i] (B, K, S, D), and their mask (B, S),
    False at padding. A forward pass attends to them; it extends them only if `grow` (a shared
    prefix in training does not grow)."""
    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.mask = None
        self.grow = True

    def expand(self, n: int) -> "KVCache":
        """This one-row cache as n rows, a view without copying: n prompts share one prefix."""
        if self.mask.shape[0] != 1:
            raise ValueError(f"only a one-row cache is expanded, not one of {self.mask.shape[0]} rows")
        c = KVCache(len(self.k))
        c.k = [t.expand(n, -1, -1, -1) for t in self.k]
        c.v = [t.expand(n, -1, -1, -1) for t in self.v]
        c.mask = self.mask.expand(n, -1)
        return c

def attend(q, k, v, attn_mask, repeat_kv: bool | None = None):
    """SDPA of q (B, H, T, D) over k, v (B, K, S, D), K dividing H: (B, H, T, D). Grouped heads go
    to SDPA as they are (enable_gqa) or repeated to H first (repeat_kv; None: on CUDA under a mask,
    where enable_gqa runs the math kernel, which builds the (B, H, T, S) scores). Both give the same
    output (tests/test_bench.py). On the CPU, bf16 runs in float32 (the flash backward is faster)."""
    groups = q.shape[1] // k.shape[1]
    if repeat_kv is None:
        repeat_kv = q.is_cuda and attn_mask is not None
    if repeat_kv and groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(groups, dim=1)
    if q.is_cpu and q.dtype != torch.float32:  # the CPU's bf16 flash backward is 3x float32's
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), attn_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])

class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share K kv heads (attend)."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, past_k=None, past_v=None):
        """Output (B, T, C) and all keys and values (B, K, S, D): past (B or 1 rows), then new."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_k is not None:  # a one-row past is broadcast
            k = torch.cat([past_k.expand(B, -1, -1, -1), k], dim=2)  # (B, K, S, D)
            v = torch.cat([past_v.expand(B, -1, -1, -1), v], dim=2)
        y = attend(q, k, v, attn_mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), k, v

class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020; LLaMA section 2.2)."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Norms first: this order fixes the order of state dicts and of seeded random weights in tests.
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, attn_mask, past_k=None, past_v=None):
        """(x, keys, values): the past keys and values are plain inputs, not a cache grown in place,
        so that activation checkpointing can run a block twice."""
        h, k, v = self.attention(self.attention_norm(x), cos, sin, attn_mask, past_k, past_v)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), k, v

def padded_positions(mask, cache):
    """Rotary positions (B, T) and attention mask (B, 1, T, S) bool, for mask (B, T) True at real
    tokens. A position counts the real tokens before it, cached too, as in an unpadded row. Sets
    cache.mask."""
    past = mask[:, :0]  # (B, S - T): no earlier tokens
    if cache is not None and cache.mask is not None:
        past = cache.mask.expand(mask.shape[0], -1)  # a one-row shared prefix counts for every row
    pos = past.sum(1, keepdim=True) + mask.cumsum(1) - 1  # (B, T)
    keys = torch.cat([past, mask], dim=1)  # (B, S)
    T, S = mask.shape[1], keys.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)  # (T, S)
    attn_mask = causal & keys[:, None, None, :]  # (B, 1, T, S)
    # A query with no visible key (a padding row) would softmax to NaN: let it see everything instead.
    attn_mask = attn_mask | ~attn_mask.any(-1, keepdim=True)
    if cache is not None and cache.grow:
        cache.mask = keys
    return pos, attn_mask

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.checkpointing = 0  # activation checkpointing of the first N blocks, set by train.py

    def forward(self, tokens, mask=None, cache=None, logits_at=None):
        """Logits float32 (B, T, V), or (N, V) at the N positions logits_at (bool (B, T) or index)
        picks, as the head is a small model's largest matmul. tokens (B, T) int64; mask (B, T) bool,
        True at real tokens, padding anywhere (no mask, no cache: fast causal path); cache: a
        KVCache of earlier tokens, grown in place unless cache.grow is False."""
        B, T = tokens.shape
        if mask is None and cache is None:  # the fast path: SDPA's is_causal, no mask tensor
            pos = torch.arange(T, device=tokens.device).expand(B, T)
            attn_mask = None
        else:
            mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
            pos, attn_mask = padded_positions(mask, cache)
        return self.forward_masked(tokens, pos, attn_mask, cache, logits_at)

    def forward_masked(self, tokens, pos, attn_mask, cache=None, logits_at=None):
        """forward with the rotary positions pos (B, T) int64 and the attention mask (B, 1, T, S)
        bool (None: causal) given, for any attention pattern (score_continuations' candidates side
        by side in one row)."""
        freqs = rope_frequencies(self.args, tokens.device)  # (D/2,)
        angles = pos.clamp(min=0)[:, None, :, None].float() * freqs  # (B, 1, T, D/2), float32
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        h = self.tok_embeddings(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            past_k = cache.k[i] if cache is not None else None
            past_v = cache.v[i] if cache is not None else None
            if i < self.checkpointing and self.training:
                # use_reentrant=False: with a frozen embedding the reentrant form gives LoRA no gradient.
                h, k, v = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, past_k, past_v,
                                                            use_reentrant=False)
            else:
                h, k, v = layer(h, cos, sin, attn_mask, past_k, past_v)
            if cache is not None and cache.grow:
                cache.k[i] = k
                cache.v[i] = v
        if logits_at is not None:
            h = h[logits_at]  # (N, C): only these rows go through the head
        return self.output(self.norm(h)).float()

# ---------------------------------------------------------------- generation and label scoring
LAST = (slice(None), -1)  # logits_at for the last position of every row
@torch.inference_mode()
def generate(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy new ids with the KV cache (Meta's generation.py at temperature 0), up to eos_id."""
    device = model.tok_embeddings.weight.device
    cache = KVCache(model.args.n_layers)
    x = torch.tensor([prompt], device=device)  # (1, T), then (1, 1) per new token
    out = []
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache, logits_at=LAST)[0]  # (V,) at the last position
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos_id:
            break
        x = torch.tensor([[nxt]], device=device)
    return out

def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (N, L) int64 right-padded with pad_id and their mask (N, L) bool; L the longest."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, device=device)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask

@torch.inference_mode()
def prefill(model, ids: list[int]) -> KVCache:
    """The one-row KV cache of `ids`, a prefix many prompts share (score_continuations' prefix)."""
    cache = KVCache(model.args.n_layers)
    x = torch.tensor([ids], device=model.tok_embeddings.weight.device)  # (1, P)
    model(x, cache=cache, logits_at=LAST)  # the head at one position only: its output is not used
    return cache

def candidate_mask(cache_mask: torch.Tensor, cand_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions (B, N) and attention mask (B, 1, N, S + N) bool for M candidates of L tokens
    each, set side by side (N = M * L) after every row of a cache whose mask is cache_mask (B, S): a
    candidate's token j sits at position (the row's real cached tokens) + j and sees those cached
    tokens and its own tokens up to j, never another candidate's. cand_mask (M, L) bool, True at
    real candidate tokens."""
    M, L = cand_mask.shape
    B = cache_mask.shape[0]
    j = torch.arange(L, device=cache_mask.device)
    pos = cache_mask.sum(1, keepdim=True) + j.repeat(M)  # (B, N)
    which = torch.arange(M, device=cache_mask.device).repeat_interleave(L)  # (N,)
    # (N, N)
    own = (which[:, None] == which[None, :]) & (j.repeat(M)[:, None] >= j.repeat(M)[None, :])
    own = own & cand_mask.reshape(1, -1)  # padding of a candidate is never a key
    # (B, N, S+N)
    keys = torch.cat([cache_mask[:, None, :].expand(B, M * L, -1), own.expand(B, -1, -1)], dim=2)
    return pos, keys[:, None]

@torch.inference_mode()
def score_continuations(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int,
                        prefix: KVCache | None = None):
    """Summed token log-probs (len(prompts), len(candidates)) float32 of each candidate after each
    prompt. A prompt runs once (right-padded, masked); then every candidate's later tokens run side
    by side in one row per prompt, attending to the prompt's cache and to their own earlier tokens
    (candidate_mask): the cache is never copied per candidate, so its memory does not grow with the
    number of candidates. prefix: a one-row cache (`prefill`) of tokens that come before every
    prompt, or None; prompts exclude them."""
    device = model.tok_embeddings.weight.device
    B, M = len(prompts), len(candidates)
    x, m = pad_right(prompts, pad_id, device)  # (B, T)
    cand, cm = pad_right(candidates, pad_id, device)  # (M, L)
    L = cand.shape[1]
    cache = KVCache(model.args.n_layers) if prefix is None else prefix.expand(B)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)  # (B,) last real tokens
    # (B, V)
    first = model(x, mask=m, cache=cache, logits_at=(torch.arange(B, device=device), last))
    first = first.log_softmax(-1)
    scores = first[:, cand[:, 0]]  # (B, M): log p(first candidate token | prompt)
    if L == 1:
        return scores.float()
    inputs = cand[:, :-1].reshape(1, -1).expand(B, -1)  # (B, M*(L-1)): all but last
    pos, attn_mask = candidate_mask(cache.mask, cm[:, :-1])
    cache.grow = False  # the candidates attend to the prompt's cache; they do not extend it
    logp = model.forward_masked(inputs, pos, attn_mask, cache).log_softmax(-1)  # (B, M*(L-1), V)
    nxt = cand[:, 1:].reshape(1, -1, 1).expand(B, -1, 1)  # (B, M*(L-1), 1): what each predicts
    tok_lp = logp.gather(-1, nxt)[..., 0].view(B, M, L - 1)
    return (scores + (tok_lp * cm[:, 1:]).sum(-1)).float()  # padding tokens count 0

# ---------------------------------------------------------------- loading a Hugging Face folder
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "output": "lm_head", "attention_norm": "input_layernorm",
            "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "ffn_norm": "post_attention_layernorm", "norm": "model.norm"}

def ours_to_hf(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'; KeyError."""
    module, _, tensor = name.rpartition(".")  # tensor: weight, or lora_A / lora_B of an adapter
    if module.startswith("layers."):
        _, i, part = module.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[part]}.{tensor}"
    return f"{HF_NAMES[module]}.{tensor}"

def read_args(path: str | os.PathLike) -> ModelArgs:
    """ModelArgs of a folder's config.json; cli.UserError naming the file if it is not LLaMA's."""
    file = Path(path) / "config.json"
    cfg = cli.read_json(file)
    try:
        return ModelArgs.from_hf(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise cli.UserError(f"{file}: not a LLaMA config ({type(e).__name__}: {e})") from None

ROPE_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # in 2023 folders

def read_tensors(path: Path, files: list[str], want: dict[str, str], args: ModelArgs, device, dtype):
    """({our name: tensor in dtype}, [unexpected HF keys]) from the safetensors `files` of folder
    `path`. want maps HF names to ours; rotary inv_freq buffers are checked (cli.check_rope_buffer)
    and dropped."""
    from safetensors import SafetensorError, safe_open  # here, not at the top: `import llama` stays light
    state = {}
    unexpected = []
    for f in files:
        try:
            with safe_open(path / f, framework="pt", device=str(device)) as st:
                for key in st.keys():
                    if key in want:
                        state[want[key]] = st.get_tensor(key).to(dtype)
                    elif ROPE_BUFFER.fullmatch(key):
                        stored = st.get_tensor(key)  # checked, then dropped
                        cli.check_rope_buffer(stored, rope_frequencies(args), key, path / f, args)
                    elif not (args.tie_embeddings and key == "lm_head.weight"):
                        unexpected.append(key)
        except (SafetensorError, OSError) as e:  # e.g. a truncated file
            raise cli.UserError(f"{path / f}: not a readable safetensors file ({e})") from None
    return state, unexpected

def load(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """(Transformer in eval mode, Tokenizer) from a FOLDER: model.safetensors or the shards of its
    index.json, built on the meta device and assigned in `dtype`, no float32 detour (as gpt-fast).
    Stored rotary inv_freq buffers are checked against config.json and dropped (cli.check_rope_buffer).
    cli.MissingError for a missing file; cli.UserError for a non-LLaMA config.json, missing or
    unexpected tensors (named), or an inv_freq buffer that config.json's rope does not give."""
    path = Path(path)
    args = read_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    tied = args.tie_embeddings  # then lm_head.weight is the embedding: neither needed nor refused
    # HF -> ours
    want = {ours_to_hf(n): n for n in model.state_dict() if not (tied and n == "output.weight")}
    files = cli.weight_files(path, FOLDER)  # model.safetensors, or the shards of its index.json
    state, unexpected = read_tensors(path, files, want, args, device, dtype)
    expected = {hf: model.state_dict()[name].shape for hf, name in want.items()}  # config.json's
    cli.check_tensors(path, expected, {ours_to_hf(n): t.shape for n, t in state.items()}, unexpected)
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), load_tokenizer(path)
