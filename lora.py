"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, arXiv 2106.09685, section 4.1).

    y = x W^T + (dropout(x) A^T B^T) * lora_alpha / r        W: (out, in) frozen, A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged
(microsoft/LoRA loralib). The base weight keeps its own name (`...wq.weight`), so a merged state
dict has the base format."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # a LLaMA block's linear layers

def drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability p, NOT rescaled by 1 / (1 - p): the adapter
    rescales its narrow (..., r) middle instead (LoRALinear.forward), as A is linear. One bool mask
    (1 byte an element, kept for backward) from uniform 31-bit integers: the CPU draws it 1.6x faster
    than bernoulli_, and ATen's dropout (a float mask, divided, multiplied) cost more than the
    adapters' matmuls on the CPU recipe's step."""
    draws = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # [0, 2^31)
    keep = draws < round((1 - p) * 2**31)  # True with probability 1 - p, to 2^-31
    return torch.where(keep, x, 0)

class SharedDropout(nn.Module):
    """Dropout (`drop`, unscaled) whose one mask the `users` adapters reading one input share (wq,
    wk, wv; w1, w3), as litgpt's fused qkv adapter does: each still sees dropout at rate p. The
    first user draws the mask, the last releases it. Masks are drawn in a fixed order within a
    block, so activation checkpointing, which restores the RNG state before it recomputes a block,
    gives backward the forward's masks. `reset` (a forward pre-hook, see apply_lora) starts each
    call of the module afresh, even after an interrupted one."""
    def __init__(self, p: float, users: int = 1):
        super().__init__()
        self.p = p
        self.users = users
        self.reset()

    def reset(self, *hook_args):
        self.calls = 0
        self.out = None

    def forward(self, x):
        if self.calls == 0:
            self.out = drop(x, self.p) if self.training and self.p > 0 else x
        out = self.out
        self.calls += 1
        if self.calls == self.users:
            self.reset()
        return out

class LoRALinear(nn.Module):
    """A frozen bias-free nn.Linear (as in LLaMA) plus a trainable float32 low-rank update of rank r
    > 0. dropout: a rate, or a SharedDropout module that other adapters use too."""
    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float | SharedDropout = 0.0):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)  # the same Parameter, frozen
        self.scale = lora_alpha / r
        self.merged = False
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as loralib, peft
        self.dropout = dropout if isinstance(dropout, nn.Module) else SharedDropout(dropout)
        self.keep = 1 - self.dropout.p  # input not rescaled: forward divides the middle by this

    def forward(self, x):
        """x W^T + (drop(x) A^T) (scale / keep) B^T, x (..., in) -> (..., out). The scalars multiply
        the (..., r) middle, not the (..., out) output. The update is added as its own product: an
        addmm into the base output ran a layer 1.2x slower in bf16."""
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # bf16 outside autocast too
        gain = self.scale / self.keep if self.training else self.scale
        h = F.linear(self.dropout(x), a) * gain  # (..., r)
        return y + h @ b.t()

    def delta(self) -> torch.Tensor:
        """B A * scale in float32, shape (out_features, in_features)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight (float32, cast back); forward skips the branch."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

SHARED_INPUT = (("wq", "wk", "wv"), ("w1", "w3"))  # adapters reading one tensor

def shared_inputs(layers: list[tuple[nn.Module, str]]) -> dict[tuple[nn.Module, tuple], list[str]]:
    """(module, target) pairs grouped by the tensor they read: {(module, group): [names]}."""
    groups = {}
    for module, name in layers:
        group = next((g for g in SHARED_INPUT if name in g), (name,))
        groups.setdefault((module, group), []).append(name)
    return groups

def apply_lora(model, targets=("wq", "wv"), r=8, lora_alpha=16, dropout=0.0, verbose=True) -> nn.Module:
    """Freeze `model`, then swap every nn.Linear named in `targets` (TARGETS; the paper's q_proj,
    v_proj are wq, wv) for a LoRALinear in place. cli.UserError, before any change, for a target
    matching no layer."""
    layers = [(module, name) for module in model.modules() for name, child in module.named_children()
              if name in targets and isinstance(child, nn.Linear)]
    unmatched = sorted(set(targets) - {name for _, name in layers})
    if unmatched:
        raise cli.UserError(f"LoRA targets {unmatched} match no linear layer; valid: {', '.join(TARGETS)}")
    model.requires_grad_(False)
    for (module, _), names in shared_inputs(layers).items():
        rate = dropout
        if dropout > 0 and len(names) > 1:
            rate = SharedDropout(dropout, users=len(names))
            module.register_forward_pre_hook(rate.reset)
        for name in names:
            setattr(module, name, LoRALinear(getattr(module, name), r, lora_alpha, rate))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={r} lora_alpha={lora_alpha} on {','.join(targets)}: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, float32: {'layers.0.attention.wq.lora_A': (r, in), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}

def merge_all(model: nn.Module, merge: bool = True):
    """Merge (or unmerge) every LoRALinear of the model."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and merge:
            m.merge()
        elif isinstance(m, LoRALinear):
            m.unmerge()
