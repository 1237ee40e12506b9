"""The two LLaMA tokenizers: sentencepiece `tokenizer.model` (LLaMA-1/2) and Hugging Face
`tokenizer.json` (LLaMA-3, SmolLM2), behind one encode/decode. Kept apart from the model, as Meta's
llama repository (`llama/tokenizer.py`) and gpt-fast (`tokenizer.py`) keep theirs; llama.load
returns one beside the model."""
import os
from pathlib import Path

import cli

FOLDER = "a Hugging Face LLaMA folder with config.json, *.safetensors and tokenizer.model or tokenizer.json"

class Tokenizer:
    """sentencepiece `tokenizer.model` (LLaMA-1/2) or `tokenizer.json` (LLaMA-3, SmolLM2); BOS/EOS only when asked.
    pad_id falls back to eos_id (losses and scores use masks). cli.MissingError without either file."""
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.sp = None
        if (path / "tokenizer.model").exists():
            import sentencepiece
            try:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except RuntimeError as e:  # a truncated or foreign file
                raise cli.UserError(f"{path / 'tokenizer.model'}: not a sentencepiece model ({e})") from None
            self.vocab_size = self.sp.vocab_size()
            cfg = dict(bos_token_id=self.sp.bos_id(), eos_token_id=self.sp.eos_id(),
                       pad_token_id=self.sp.pad_id())  # the names config.json uses
        elif (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            self.hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            self.vocab_size = self.hf.get_vocab_size()
            cfg = cli.read_json(path / "config.json") if (path / "config.json").exists() else {}
        else:
            raise cli.MissingError(f"{path}: neither tokenizer.model nor tokenizer.json; expected {FOLDER}")
        self.bos_id = cfg.get("bos_token_id")
        eos = cfg.get("eos_token_id")
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        pad = cfg.get("pad_token_id")
        self.pad_id = pad if pad is not None and pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self.sp else self.hf.encode(text, add_special_tokens=False).ids
        bos_ids = [self.bos_id] if bos and self.bos_id is not None else []  # no BOS: bare
        return bos_ids + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp else self.hf.decode(ids, skip_special_tokens=True)

def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer(path)
