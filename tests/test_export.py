"""convert.export_peft / export_merged (train.py --export-peft / --export-merged): Hugging Face peft and transformers
load the exported adapter and merged checkpoint and give the logits of our model with the adapter."""
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

import cli
import convert
import llama
import lora
from helpers import make_checkpoint, maxdiff

TARGETS = "wq,wk,wv,wo,w1,w2,w3"  # every target, so every name mapping is exercised


@pytest.fixture
def ckpt(tmp_path, shared_models):
    """A train.py-format checkpoint with a random nonzero adapter on every target."""
    make_checkpoint(tmp_path / "model", shared_models, tie_word_embeddings=True)
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
