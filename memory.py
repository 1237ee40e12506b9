"""The memory plan of a training run, from a model's config.json alone: what `--dry-run` prints, how many blocks
`--grad-ckpt auto` checkpoints to fit a GPU (the recipe is tuned to fit a 40 GB A100), and how many prompts a dev
evaluation scores at once. Terms in bytes; `cfg` is a train.Config.

Counted from what autograd keeps for backward in llama.Block and lora.LoRALinear (Chen et al. 2016, arXiv
1604.06174, for checkpointing); checked against measured peaks in tests/test_memory.py."""
import os
from dataclasses import replace

import torch

import cli
import convert
import data
import llama

EVAL_BATCH = 8  # prompts per scoring batch at the dev evaluations, unless the memory plan says fewer
SAFETY = 0.85  # auto checkpointing plans for this share of the memory: the plan's CUDA terms are estimates

def memory_plan(args: llama.ModelArgs, cfg, blocks: int) -> list[tuple[str, int]]:
    """Peak memory of a training run in bytes, by term, from the model's ModelArgs alone (no weights loaded): the
    tensors autograd keeps for backward in our Block and LoRALinear, for one micro-batch of batch_size sequences
    padded to max_len that share no prefix (the worst case), with the first `blocks` blocks checkpointed. Base
    weights and activations are in cfg.dtype (bf16 under autocast); LoRA weights, their gradients and AdamW's two
    moments are float32."""
    a = 2 if cfg.dtype == "bfloat16" else 4  # bytes per base weight and per activation
    C, F_, H, V = args.dim, args.hidden_dim, args.n_heads, args.vocab_size
    Q = H * args.head_dim
    KV = args.n_kv_heads * args.head_dim
    tokens = cfg.batch_size * cfg.max_len
    targets = cfg.targets.split(",")
    io = dict(wq=(C, Q), wk=(C, KV), wv=(C, KV), wo=(Q, C), w1=(C, F_), w3=(C, F_), w2=(F_, C))  # (in, out)
    n_base = args.n_layers * (sum(i * o for i, o in io.values()) + 2 * C) + V * C * (2 - args.tie_embeddings) + C
    n_lora = args.n_layers * sum(cfg.r * sum(io[t]) for t in targets)
    # Saved per token by one block: each RMSNorm's input in float32 (on CUDA a float32 copy of the bf16 stream);
    # SDPA's q, k (after rotary), v, output and a float32 log-sum-exp per head (flash kernels: no (T, T) matrix);
    # the feed-forward's w1 x, silu(w1 x) and w3 x.
    block = 2 * 4 * C + a * (2 * Q + 2 * KV + 3 * F_) + 4 * H
    # LoRA keeps the input of each adapter and its (T, r) middle; adapters reading the same tensor (wq, wk, wv;
    # w1, w3) share it, and with dropout its dropped copy and the bool mask (lora.SharedDropout, lora.drop).
    share = dict(wq="wq", wk="wq", wv="wq", wo="wo", w1="w1", w3="w1", w2="w2")
    kept = {share[t] for t in targets}
    mask_bytes = 1 if cfg.dropout > 0 else 0
    block += sum((a + mask_bytes) * io[t][0] for t in kept) + a * cfg.r * len(targets)
    # A checkpointed block keeps only its input; backward recomputes one block at a time.
    act = (args.n_layers - blocks) * tokens * block + blocks * tokens * a * C
    if blocks:
        act += tokens * block
    plan = [(f"base weights ({n_base / 1e9:.2f}B parameters, {cfg.dtype})", a * n_base),
            (f"LoRA ({n_lora / 1e6:.2f}M parameters): weights, gradients, AdamW moments", 16 * n_lora),
            (f"activations ({cfg.batch_size} x {cfg.max_len} tokens, {blocks} blocks checkpointed)", act),
            ("backward: gradients in flight through one block", tokens * a * (3 * F_ + 2 * C)),
            # the head runs only where the loss is taken, ~4 answer tokens a sequence: logits, log-softmax, grads
            ("logits (N answer positions, vocab) float32", cfg.batch_size * 4 * V * 16)]
    if cfg.device.startswith("cuda"):
        plan.append(("CUDA context and allocator slack (estimate)", 2 ** 30))
    return plan

def plan_bytes(args: llama.ModelArgs, cfg, blocks: int) -> int:
    return sum(size for _, size in memory_plan(args, cfg, blocks))

def eval_plan(args: llama.ModelArgs, cfg, batch: int) -> list[tuple[str, int]]:
    """Peak memory in bytes, by term, of a dev evaluation in the middle of a run: the weights and the adapter's
    training state stay, the activations of training are gone. Scoring (eval.predict) runs `batch` prompts of up
    to max_len tokens with no autograd: their KV cache in every layer, one layer's activations at a time, then
    each label's later tokens side by side (llama.score_continuations), ~4 tokens for each of C labels."""
    a = 2 if cfg.dtype == "bfloat16" else 4
    C, F_, V = args.dim, args.hidden_dim, args.vocab_size
    KV = args.n_kv_heads * args.head_dim
    n_labels = max(len(data.LABELS[name]) for name in data.DATASETS)
    tokens = batch * (cfg.max_len + 4 * n_labels)
    kept = ("base weights", "LoRA", "CUDA")  # what a dev evaluation shares with training
    weights = [term for term in memory_plan(args, cfg, 0) if term[0].startswith(kept)]
    return weights + [
        (f"KV cache ({batch} prompts x {cfg.max_len} tokens, {args.n_layers} layers)",
         2 * args.n_layers * tokens * KV * a),
        ("activations of one block (no autograd)", tokens * a * (4 * C + 2 * KV + 3 * F_)),
        ("logits and log-probabilities of the labels' tokens, float32", 2 * batch * 4 * n_labels * V * 4)]

def eval_batch(args: llama.ModelArgs, cfg, log=print) -> int:
    """The dev evaluation's batch: EVAL_BATCH, or fewer prompts when eval_plan does not fit SAFETY x the memory
    (said so), so that a run the plan admits never fails at its first evaluation."""
    budget = device_memory(cfg)
    if budget is None:
        return EVAL_BATCH
    fits = [b for b in range(1, EVAL_BATCH + 1) if sum(s for _, s in eval_plan(args, cfg, b)) <= SAFETY * budget]
    batch = max(fits, default=1)
    if batch < EVAL_BATCH:
        log(f"dev evaluation in batches of {batch} prompts (not {EVAL_BATCH}) to fit {budget / 2 ** 30:.1f} GiB")
    return batch

def device_memory(cfg) -> int | None:
    """Bytes a run may use: --gpu-mem, else the GPU's free memory or the free RAM; None when unknown."""
    if cfg.gpu_mem:
        return int(cfg.gpu_mem * 2 ** 30)
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(cfg.device))[0]
    if cfg.device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return None

def checkpointed_blocks(cfg, args: llama.ModelArgs, log=print) -> int:
    """How many blocks to checkpoint for --grad-ckpt all, none or N; for auto the fewest for which the memory plan
    fits SAFETY x device_memory (all when none fits or the memory is unknown). UsageError for N > n_layers."""
    n = args.n_layers
    if cfg.grad_ckpt in ("all", "none"):
        return n if cfg.grad_ckpt == "all" else 0
    if cfg.grad_ckpt != "auto":
        if int(cfg.grad_ckpt) > n:
            raise cli.UsageError(f"--grad-ckpt {cfg.grad_ckpt}: the model has {n} blocks")
        return int(cfg.grad_ckpt)
    budget = device_memory(cfg)
    blocks = n if budget is None else next((k for k in range(n + 1) if plan_bytes(args, cfg, k) <= SAFETY * budget), n)
    shown = "unknown memory" if budget is None else f"{budget / 2 ** 30:.1f} GiB"
    log(f"--grad-ckpt auto: checkpointing {blocks} of {n} blocks (plan {plan_bytes(args, cfg, blocks) / 2 ** 30:.1f}"
        f" GiB of {shown})")
    return blocks

def print_plan(cfg) -> None:
    """Print memory_plan for cfg.model's config.json in GiB, whether it fits, and with --grad-ckpt auto the
    largest micro-batch that would fit without checkpointing."""
    folder = convert.model_dir(cfg.model)
    args = llama.read_args(folder)
    blocks = checkpointed_blocks(cfg, args, log=lambda *_: None)
    print(f"memory plan: {folder.name} on {cfg.device}, LoRA r={cfg.r} on {cfg.targets}, batch {cfg.batch_size} "
          f"x {cfg.max_len} tokens, dropout {cfg.dropout}, --grad-ckpt {cfg.grad_ckpt}: {blocks} of "
          f"{args.n_layers} blocks checkpointed")
    for name, size in memory_plan(args, cfg, blocks):
        print(f"  {size / 2 ** 30:8.3f} GiB  {name}")
    total = plan_bytes(args, cfg, blocks)
    budget = device_memory(cfg)
    verdict = ""
    if budget is not None:
        verdict = f": {'fits' if total <= budget else 'does NOT fit'} in {budget / 2 ** 30:.1f} GiB"
    print(f"  {total / 2 ** 30:8.3f} GiB  total{verdict}")
    if cfg.grad_ckpt == "auto" and budget is not None:
        fits = [b for b in range(1, 257) if plan_bytes(args, replace(cfg, batch_size=b), 0) <= SAFETY * budget]
        print(f"  without checkpointing, micro-batches of up to {max(fits, default=0)} x {cfg.max_len} tokens fit")
    batch = eval_batch(args, cfg, log=lambda *_: None)
    print(f"evaluation plan: dev scoring in batches of {batch} prompts (the weights and LoRA state as above)")
    for name, size in eval_plan(args, cfg, batch)[2:]:
        print(f"  {size / 2 ** 30:8.3f} GiB  {name}")
    peak = sum(size for _, size in eval_plan(args, cfg, batch))
    print(f"  {peak / 2 ** 30:8.3f} GiB  evaluation peak, beside training's {total / 2 ** 30:.3f} GiB")
