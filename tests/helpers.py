"""Shared test utilities: tiny random checkpoints in Hugging Face format, with the tok512 tokenizer."""
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 512  # tok512: bos 1, eos 2, no pad (so the tokenizer's pad_id == eos_id)
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


def make_checkpoint(folder: Path, shared_models: Path, seed: int = 0, std: float = 0.15, **overrides):
    """Save a random transformers LlamaForCausalLM (TINY config + overrides) into folder with save_pretrained,
    plus tok512 as tokenizer.model; returns the HF model (eval mode). Weights are redrawn with `std` (HF's 0.02
    gives near-zero logits that hide errors) and norm weights made non-unit."""
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    shutil.copy(Path(shared_models) / "tok512" / "tok512.model", folder / "tokenizer.model")
    return hf


def tiny_model(seed: int = 0, **overrides):
    """Our llama.Transformer with random weights (no file), float32, eval mode; args from TINY + overrides."""
    import llama
    cfg = {**TINY, **overrides}
    args = llama.ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                           n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                           head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
                           hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                           norm_eps=cfg["rms_norm_eps"], max_seq_len=cfg["max_position_embeddings"])
    torch.manual_seed(seed)
    model = llama.Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


MELD_COLUMNS = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime"


def make_meld(data_dir: Path, n_dialogues: int = 6, n_utterances: int = 4, seed: int = 0, text=None, label=None):
    """Write a small synthetic MELD (train/dev/test CSVs in MELD's format) under data_dir/meld; returns data_dir.
    Utterances are random words and labels unless `text` / `label` fix them (then every prompt has one length)."""
    import random
    import data
    rng = random.Random(seed)
    words = "so what we were on a break you are my lobster how you doing pivot".split()
    (data_dir / "meld").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        lines = [MELD_COLUMNS]
        for d in range(n_dialogues):
            for u in range(n_utterances):
                t = text or " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
                lines.append(f"{len(lines)},{t},Speaker{u % 2},{label or rng.choice(data.LABELS['meld'])},neutral,"
                             f"{d},{u},1,1,\"00:00:01,000\",\"00:00:02,000\"")
        (data_dir / "meld" / f"{split}_sent_emo.csv").write_text("\n".join(lines) + "\n")
    return data_dir
