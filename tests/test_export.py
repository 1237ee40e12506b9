"""convert.export_peft / export_merged (train.py --export-peft / --export-merged): Hugging Face peft and transformers
load the exported adapter and merged checkpoint and give the logits of our model with the adapter; the merged export
streams shards of --shard-size with an index, in the dtype it states."""
import json

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

import cli
import convert
import llama
import lora
import train
from helpers import make_checkpoint, maxdiff

TARGETS = "wq,wk,wv,wo,w1,w2,w3"  # every target, so every name mapping is exercised


def write_ckpt(tmp_path, shared_models, **overrides):
    """A train.py-format checkpoint with a random nonzero adapter on every target, on a tiny model
    (helpers.TINY + overrides) in tmp_path / "model"."""
    make_checkpoint(tmp_path / "model", shared_models, **overrides)
    model, _ = llama.load(tmp_path / "model")
    lora.apply_lora(model, TARGETS.split(","), 4, 8, verbose=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.1)
    config = dict(model=str(tmp_path / "model"), data="meld", window=2, max_len=256, targets=TARGETS, r=4, lora_alpha=8,
                  dropout=0.05)
    cli.atomic_write(tmp_path / "ckpt.pt", dict(config=config, lora=lora.lora_state_dict(model)))
    return tmp_path / "ckpt.pt"


@pytest.fixture
def ckpt(tmp_path, shared_models):
    return write_ckpt(tmp_path, shared_models, tie_word_embeddings=True)


def test_export_peft_and_merged_give_our_logits(ckpt, tmp_path):
    ours, tok, _ = convert.load_checkpoint(ckpt)
    x = torch.tensor([tok.encode("Ross: We were on a break!\n### Response:\n", bos=True)])
    with torch.no_grad():
        want = ours(x)
    convert.export_peft(ckpt, tmp_path / "peft")
    convert.export_merged(ckpt, tmp_path / "merged")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert maxdiff(base(x).logits, want) > 1e-2  # the adapter matters
        peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        assert maxdiff(peft(x).logits, want) <= 1e-4
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert maxdiff(merged(x).logits, want) <= 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {f.name for f in (tmp_path / "merged").iterdir()}


def test_export_merged_streams_shards_with_an_index(tmp_path, shared_models, monkeypatch, capsys):
    """1 MB shards of a ~6 MB model: several shards and an index as published folders hold them; no save call
    gets more than one shard's bytes (what is held beside the model); transformers gives our logits."""
    ckpt = write_ckpt(tmp_path, shared_models, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    saved = []  # bytes handed to each save_file call
    real_save = safetensors.torch.save_file

    def counting_save(tensors, filename, metadata=None):
        saved.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", counting_save)
    out = tmp_path / "merged"
    train.main(["--export-merged", str(out), "--from", str(ckpt), "--dtype", "float32", "--shard-size", "0.001"])
    assert "float32 weights" in capsys.readouterr().out
    shards = sorted(f.name for f in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and len(saved) == len(shards) and max(saved) <= 10**6
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(saved)
    ours, tok, _ = convert.load_checkpoint(ckpt)
    x = torch.tensor([tok.encode("Ross: We were on a break!\n### Response:\n", bos=True)])
    merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert maxdiff(merged(x).logits, ours(x)) <= 1e-5


def test_export_merged_writes_and_states_its_dtype(ckpt, tmp_path, capsys):
    """--dtype bfloat16 writes bfloat16 and says the merge rounds the update; with no --dtype the base's float32,
    in one model.safetensors at the default 5 GB, replacing an earlier export's shards."""
    out = tmp_path / "merged"
    train.main(["--export-merged", str(out), "--from", str(ckpt), "--dtype", "bfloat16", "--shard-size", "0.0001"])
    line = capsys.readouterr().out
    assert "bfloat16 weights" in line and "rounds the LoRA update" in line
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in safetensors.torch.load_file(next(out.glob("model-*.safetensors"))).values()} == {
        torch.bfloat16}
    train.main(["--export-merged", str(out), "--from", str(ckpt), "--overwrite"])
    assert "float32 weights in 1 file(s)" in capsys.readouterr().out
    assert sorted(f.name for f in out.glob("model*")) == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_a_stopped_overwrite_export_never_mixes_two_exports(tmp_path, shared_models, monkeypatch):
    """--export-merged --overwrite removes the earlier export's weights before writing its own, the index last: an
    export stopped after its first shard leaves that shard alone, which loads nothing, never the earlier shards
    and index beside it, which would load as a mixture of two models."""
    ckpt = write_ckpt(tmp_path, shared_models, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    out = tmp_path / "merged"
    args = ["--export-merged", str(out), "--from", str(ckpt), "--dtype", "float32", "--shard-size", "0.001"]
    train.main(args)
    first = sorted(f.name for f in out.glob("model*"))
    calls = []
    real_save = safetensors.torch.save_file

    def stopping_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is written
        return real_save(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", stopping_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--overwrite"])
    assert len(first) >= 4 and first[-1] == "model.safetensors.index.json"
    assert sorted(f.name for f in out.glob("model*")) == [first[0]]
