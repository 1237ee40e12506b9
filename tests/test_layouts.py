"""Every layout users download loads, trains and evaluates from the command line (issue 21, point 1).

Built at tiny sizes: transformers writes the weights, the test adds what the published folders hold.
- LLaMA-2 (meta-llama/Llama-2-7b-hf, 2023): float16 shards with model.safetensors.index.json (total_size), the
  rotary `inv_freq` buffers stored in the shards and listed in the index (float32, or float16 after a .half()),
  tokenizer.model, special_tokens_map.json, generation_config.json.
- Llama-3.x: grouped-query attention, rope_scaling "llama3", bfloat16, tokenizer.json only.
- a folder inside the Hugging Face cache (snapshots/<hash>/ of symlinks into blobs/), given as a repo id.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import cli
import convert
import llama
from helpers import TINY, make_checkpoint, make_meld, maxdiff

ROOT = Path(__file__).resolve().parents[1]
REPO = "meta-llama/Llama-2-7b-hf"
INDEX = "model.safetensors.index.json"  # a sharded folder's map from tensor names to files
SNAPSHOT = "01c7f73d771dfac7d292323805ebc428287df4f9"  # a snapshot hash as the Hub names one
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # Llama 3.1's form; 64 so that head_dim 16 feels it


# ---------------------------------------------------------------- the layouts

def inv_freq_2023(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(head_dim/2,) float32: the buffer transformers' LlamaRotaryEmbedding of 2023 stored, as it computed it."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def add_rope_buffers(folder: Path, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Store each block's self_attn.rotary_emb.inv_freq (times `scale`) in `dtype` in the shard holding the
    block's q_proj, and list it in the index with the total_size grown, as the 2023 LLaMA-2 folders do."""
    index_file = folder / INDEX
    index = json.loads(index_file.read_text())
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        key = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
        shard = index["weight_map"][f"model.layers.{i}.self_attn.q_proj.weight"]
        tensors = load_file(folder / shard)
        tensors[key] = (inv_freq_2023(head_dim) * scale).to(dtype)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        index["weight_map"][key] = shard
        index["metadata"]["total_size"] += tensors[key].numel() * tensors[key].element_size()
    index_file.write_text(json.dumps(index, indent=2))


def llama2_folder(folder: Path, shared_models: Path, inv_freq_dtype=torch.float32, scale: float = 1.0) -> Path:
    """A tiny meta-llama/Llama-2-7b-hf: multi-head (n_kv_heads == n_heads), float16 shards with the rotary
    buffers, tokenizer.model (tok512) and the small JSON files of the published folder."""
    hf = make_checkpoint(folder, shared_models, num_key_value_heads=TINY["num_attention_heads"])
    (folder / "model.safetensors").unlink()
    hf.to(torch.float16).save_pretrained(folder, max_shard_size="100KB")  # about 250 KB: 3 or more shards
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    add_rope_buffers(folder, inv_freq_dtype, scale)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
         "top_p": 0.9, "max_length": 4096}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}))
    return folder


def byte_bpe(texts: list[str]):
    """A small byte-level BPE tokenizer.json as Llama 3's (no unknown token), with its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.train_from_iterator(texts, trainer)
    return tok


def llama3_folder(folder: Path) -> Path:
    """A tiny Llama-3.1: GQA, rope_theta 500000 with rope_scaling llama3 in config.json as published,
    bfloat16 weights in one model.safetensors, tokenizer.json only."""
    import data
    words = "so what we were on a break you are my lobster how you doing pivot Speaker0 Speaker1".split()
    turn = {"speaker": "Speaker0", "text": " ".join(words)}
    tok = byte_bpe([data.make_prompt([turn], turn, data.LABELS["meld"])])
    bos, eos, eot = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    torch.manual_seed(3)
    config = LlamaConfig(**{**TINY, "bos_token_id": bos, "eos_token_id": [eos, eot]}, rope_theta=500000.0,
                         rope_scaling=dict(LLAMA3_ROPE))
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    hf.to(torch.bfloat16).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # transformers 5 writes this; Meta's folders have the two keys below
    cfg.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    assert not (folder / "tokenizer.model").exists()
    return folder


def hub_cache_folder(hub: Path, src: Path, repo: str = REPO, snapshot: str = SNAPSHOT) -> Path:
    """Put folder `src` into a Hugging Face cache `hub` as huggingface_hub does: each file a blob named by its
    hash under blobs/, the snapshot's files relative symlinks to them, refs/main naming the snapshot."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / snapshot
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo_dir / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(snapshot)
    return snap


# ---------------------------------------------------------------- through the command line

def run(script: str, *argv, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def train_and_eval(model: str, tmp: Path, env: dict | None = None) -> str:
    """train.py one step on a tiny synthetic MELD, then eval.py on its checkpoint; both exit 0. Returns
    train.py's stderr."""
    env = {"DIALOGUELLM_DATA": str(make_meld(tmp / "data")), **(env or {})}
    out = tmp / "run"
    t = run("train.py", "--data", "meld", "--model", model, "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1,
            "--dev-limit", 4, "--out", out, "--device", "cpu", "--dtype", "float32", env=env)
    assert t.returncode == 0, t.stderr[-3000:]
    assert (out / "ckpt.pt").is_file()
    e = run("eval.py", out / "ckpt.pt", "--limit", 4, env=env)
    assert e.returncode == 0, e.stderr[-3000:]
    return t.stderr


@pytest.mark.slow
@pytest.mark.parametrize("inv_freq_dtype", [torch.float32, torch.float16])
def test_llama2_folder_trains_and_evaluates(tmp_path, shared_models, inv_freq_dtype):
    folder = llama2_folder(tmp_path / "Llama-2-7b-hf", shared_models, inv_freq_dtype)
    train_and_eval(str(folder), tmp_path)


@pytest.mark.slow
def test_llama3_folder_trains_and_evaluates(tmp_path):
    folder = llama3_folder(tmp_path / "Llama-3.1-8B")
    args = llama.read_args(folder)
    assert args.n_kv_heads < args.n_heads and args.rope_scaling["rope_type"] == "llama3"
    train_and_eval(str(folder), tmp_path)


@pytest.mark.slow
def test_hub_cache_repo_id_trains_and_evaluates(tmp_path, shared_models):
    src = llama2_folder(tmp_path / "download", shared_models)
    snap = hub_cache_folder(tmp_path / "hub", src)
    assert all(f.is_symlink() for f in snap.iterdir())
    err = train_and_eval(REPO, tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert str(snap) in err  # it says which folder it took
    # the run is pinned to that snapshot: a newer one arriving in the cache later does not change its base model
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["config"]["model"] == str(snap.resolve())
    env = {"HF_HUB_CACHE": str(tmp_path / "none"), "DIALOGUELLM_DATA": str(tmp_path / "data")}
    e = run("eval.py", tmp_path / "run" / "ckpt.pt", "--limit", 4, env=env)
    assert e.returncode == 0, e.stderr[-3000:]  # evaluated without the cache variable, from the pinned folder


# ---------------------------------------------------------------- the weights loaded are the right ones

def test_llama2_folder_gives_transformers_logits(tmp_path, shared_models):
    folder = llama2_folder(tmp_path / "m", shared_models)
    ours, tok = llama.load(folder)
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("Ross: We were on a break!\n### Response:\n", bos=True)])
    with torch.no_grad():
        want = ref(x).logits
        assert want.abs().max() > 1  # logits large enough that a wrong weight shows
        assert maxdiff(ours(x), want) <= 1e-3


def test_llama3_folder_gives_transformers_logits(tmp_path):
    folder = llama3_folder(tmp_path / "m")
    ours, tok = llama.load(folder)
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ref.config.rope_scaling["rope_type"] == "llama3"
    x = torch.tensor([tok.encode("Ross: We were on a break! " * 12, bos=True)])  # past 64: the scaling counts
    with torch.no_grad():
        assert maxdiff(ours(x), ref(x).logits) <= 1e-3


# ---------------------------------------------------------------- what is still refused

def test_scaled_inv_freq_is_a_one_line_error(tmp_path, shared_models):
    folder = llama2_folder(tmp_path / "m", shared_models, scale=0.5)  # a scaled rope config.json does not say
    r = run("train.py", "--data", "meld", "--model", folder, "--max-steps", 1, "--out", tmp_path / "run",
            "--device", "cpu", env={"DIALOGUELLM_DATA": str(make_meld(tmp_path / "data"))})
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), r.stderr[-3000:]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in lines[0] and "model-0000" in lines[0]


def test_inv_freq_checked_within_its_dtype(tmp_path):
    """float16 and bfloat16 rounding pass; one part in 1000 is refused in float32, where it is 8000 eps."""
    args = llama.ModelArgs()  # LLaMA-2-7B: head_dim 128, rope_theta 10000
    want = llama.rope_frequencies(args)
    cli.check_rope_buffer(want.to(torch.float16), want, "k", tmp_path / "f", args)
    cli.check_rope_buffer(want.to(torch.bfloat16), want, "k", tmp_path / "f", args)
    with pytest.raises(cli.UserError, match="k holds rotary frequencies"):
        cli.check_rope_buffer(want * (1 + 1e-3), want, "k", tmp_path / "f", args)
    with pytest.raises(cli.UserError, match="shape"):
        cli.check_rope_buffer(want[:-1], want, "k", tmp_path / "f", args)


def test_other_unknown_tensor_still_refused(tmp_path, shared_models):
    folder = llama2_folder(tmp_path / "m", shared_models)
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(folder / shard)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(TINY["hidden_size"])
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    with pytest.raises(cli.UserError, match=r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        llama.load(folder)


# ---------------------------------------------------------------- a repo id in the Hugging Face cache

def snapshot_with_config(hub: Path, snapshot: str, mtime: float) -> Path:
    snap = hub / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / snapshot
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    os.utime(snap, (mtime, mtime))
    return snap


def test_repo_id_takes_refs_main_else_newest_snapshot(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # then the cache is $HF_HOME/hub
    hub = tmp_path / "hf" / "hub"
    old = snapshot_with_config(hub, "a" * 40, 1_000_000)
    new = snapshot_with_config(hub, "b" * 40, 2_000_000)
    assert convert.model_dir(REPO) == new  # no refs/main: the newest
    (hub / "models--meta-llama--Llama-2-7b-hf" / "refs").mkdir()
    (hub / "models--meta-llama--Llama-2-7b-hf" / "refs" / "main").write_text("a" * 40 + "\n")
    assert convert.model_dir(REPO) == old  # refs/main names the one the Hub calls newest
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE comes first
    with pytest.raises(cli.MissingError, match="models--meta-llama--Llama-2-7b-hf"):
        convert.model_dir(REPO)


def test_repo_id_not_cached_is_one_clear_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "DIALOGUELLM_DATA": str(make_meld(tmp_path / "data"))}
    r = run("train.py", "--model", REPO, "--out", tmp_path / "run", "--device", "cpu", env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --model meta-llama/Llama-2-7b-hf: "), lines
    assert str(tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots") in lines[0]


# ---------------------------------------------------------------- configs this model does not compute

@pytest.mark.parametrize("change, says", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="qwen2"), "model_type 'qwen2'"),
    (dict(num_key_value_heads=3), "do not split into 3 kv groups"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling llama3 needs"),
])
def test_a_config_llama_py_would_compute_wrongly_is_refused(tmp_path, change, says):
    """Fields that change the maths are read, not ignored: a GELU model or another architecture would run as a
    SwiGLU LLaMA with the same tensor names, silently wrong."""
    cfg = dict(model_type="llama", hidden_act="silu", hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, num_hidden_layers=2, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(cli.UserError, match=says):
        llama.read_args(tmp_path)


def test_tensor_shapes_that_do_not_fit_config_json_are_one_line(tmp_path, shared_models):
    folder = llama2_folder(tmp_path / "m", shared_models)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] + 1)))
    with pytest.raises(cli.UserError, match=r"tensor shapes do not fit config.json: model.embed_tokens.weight"):
        llama.load(folder)


def test_eval_model_flag_repoints_a_checkpoint_whose_base_moved(tmp_path, shared_models):
    folder = llama2_folder(tmp_path / "base", shared_models)
    train_and_eval(str(folder), tmp_path)
    folder.rename(tmp_path / "moved")
    env = {"DIALOGUELLM_DATA": str(tmp_path / "data")}
    gone = run("eval.py", tmp_path / "run" / "ckpt.pt", "--limit", 4, env=env)
    assert gone.returncode == 1 and "no config.json there" in gone.stderr.splitlines()[-1]
    moved = run("eval.py", tmp_path / "run" / "ckpt.pt", "--limit", 4, "--model", tmp_path / "moved", env=env)
    assert moved.returncode == 0, moved.stderr[-3000:]
