"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, arXiv 2106.09685, section 4.1).

    y = x W^T + (dropout(x) A^T B^T) * lora_alpha / r        W: (out, in) frozen, A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged (microsoft/LoRA
loralib). The base weight keeps its own name (`...wq.weight`), so a merged state dict has the base format.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen nn.Linear (bias-free, as in LLaMA) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.lora_alpha, self.scale, self.merged = r, lora_alpha, lora_alpha / r, False
        out_features, in_features = base.weight.shape
        kw = dict(device=base.weight.device, dtype=torch.float32)  # adapter weights train in float32
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # same as nn.Linear's init, as loralib and peft do
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        """B A * scale in float32, shape (out_features, in_features)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight (in float32, then cast back); forward then skips the branch."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def apply_lora(model: nn.Module, targets=("wq", "wv"), r: int = 8, lora_alpha: float = 16, dropout: float = 0.0,
               verbose: bool = True) -> nn.Module:
    """Freeze `model` and replace every nn.Linear whose attribute name is in `targets` by a LoRALinear, in place.

    targets use our module names (wq, wk, wv, wo, w1, w2, w3; the paper's q_proj/v_proj are wq/wv).
    Only LoRA parameters stay trainable; prints trainable and total parameter counts. Raises ValueError if a
    target matches no layer.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, lora_alpha, dropout))
                found.add(name)
    if set(targets) - found:
        raise ValueError(f"LoRA targets {sorted(set(targets) - found)} match no nn.Linear in the model")
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={r} lora_alpha={lora_alpha} on {','.join(targets)}: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: {'layers.0.attention.wq.lora_A': (r, in), '...lora_B': (out, r)}, float32."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def read_checkpoint(path) -> dict:
    """A train.py checkpoint as a dict (adapter under "lora", run config under "config", ...), on CPU.

    Loaded with torch.load(weights_only=True): a file holding arbitrary pickled objects is refused with a
    ValueError naming it, since unpickling them could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a payload that is not plain tensors and containers
        raise ValueError(f"{path}: not a safe DialogueLLM checkpoint ({type(e).__name__}: {e})") from None


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where) -> None:
    """Load adapter tensors into a model that has had apply_lora; KeyError naming `where` unless they match."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)  # the frozen base weights are not in `state`
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{where}: adapter does not fit the model: {e}") from None
    missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
    if missing or unexpected:
        raise KeyError(f"{where}: adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def merge_all(model: nn.Module, merge: bool = True):
    """Merge (or unmerge) every LoRALinear of the model."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge() if merge else m.unmerge()
