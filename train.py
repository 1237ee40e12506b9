"""Instruction-tune a LLaMA model with LoRA for emotion recognition in conversations (DialogueLLM).

    python train.py --data meld                      # embedded SmolLM2-135M, CPU recipe
    python train.py --data meld --model /path/Llama-2-7b-hf   # on a GPU: the paper's recipe
    torchrun --nproc_per_node 2 train.py ...          # data-parallel
    python train.py --dry-run --model DIR --gpu-mem 24    # the memory the run needs, from config.json alone
    python train.py --resume runs/meld/ckpt_last.pt       # continue a stopped run exactly
    python train.py --export-peft DIR --from runs/meld/ckpt.pt    # or --export-merged DIR: a full HF checkpoint

Every default lives once, in Config; fields left None are filled from RECIPES by device (see README).
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import llama
import lora
from eval import calibrate, load_checkpoint, predict, report


@dataclass
class Config:
    data: str = "meld"  # meld, emorynlp, iemocap, a comma list, or all
    data_dir: str | None = None
    model: str = "default"  # "default" (SmolLM2-135M-Instruct, no download) or a HF-format folder
    out: str = "runs/meld"
    descriptions: str | None = None  # video descriptions JSONL
    window: int = 2  # previous utterances in the prompt (the paper found 1-2 best)
    max_len: int = 256  # prompt + answer tokens (the authors' scripts)
    targets: str | None = None  # LoRA targets among wq,wk,wv,wo,w1,w2,w3
    r: int | None = None
    lora_alpha: float | None = None
    dropout: float = 0.05
    lr: float | None = None
    warmup: int | None = None  # linear warmup steps, then cosine decay to lr/10
    epochs: float | None = None
    batch_size: int | None = None  # sequences per micro-batch (per process)
    grad_accum: int | None = None  # micro-batches per optimizer step (all processes together)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_ckpt: bool | None = None  # per-block activation checkpointing
    max_steps: int = 0  # stop after this many optimizer steps (0: the epochs decide)
    eval_every: int = 0  # dev evaluation every N steps (0: at the end of each epoch)
    dev_limit: int | None = None  # dev utterances used for model selection (None: all)
    calibrate: bool = True  # fit per-label score offsets on dev (eval.fit_label_bias), saved with the adapter
    save_every: int = 50  # steps between ckpt_last.pt writes
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# The paper's recipe on a GPU (LLaMA-2-7B, bf16); on CPU a budget recipe for the 135M default model that
# finishes in under 2 hours on 2 cores (README: "Choices").
RECIPES = {
    "cuda": dict(targets="wq,wv", r=8, lora_alpha=64, lr=3e-4, warmup=100, epochs=3, batch_size=4, grad_accum=15,
                 grad_ckpt=True),
    "cpu": dict(targets="wq,wk,wv,wo,w1,w2,w3", r=16, lora_alpha=32, lr=1e-3, warmup=30, epochs=1, batch_size=8,
                grad_accum=2, grad_ckpt=False),
}


def get_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine decay to lr/10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within chunks of 64 batches by length, cut, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 64
    order = [i for s in range(0, len(order), chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[tuple[list[int], int]], pad_id: int, device):
    """Right-pad a micro-batch. Returns tokens (B, T) int64, where (B, T) bool marks positions whose next token
    is an answer token, and those next tokens (N,). The loss mask comes from lengths, never from pad ids, so
    the EOS survives when pad_id == eos_id."""
    T = max(len(ids) for ids, _ in encoded)
    x = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    where = torch.zeros(len(encoded), T, dtype=torch.bool)
    for i, (ids, n_answer) in enumerate(encoded):
        x[i, :len(ids)] = torch.tensor(ids)
        where[i, len(ids) - n_answer - 1:len(ids) - 1] = True
    targets = x[:, 1:][where[:, :-1]]
    return x.to(device), where.to(device), targets.to(device)


def atomic_save(obj, path: Path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def memory_plan(args: llama.ModelArgs, cfg: Config) -> list[tuple[str, int]]:
    """Peak memory of a training run in bytes, by term, from the model's ModelArgs alone (no weights loaded).

    Counts the tensors autograd keeps for backward in our Block and LoRALinear, for one micro-batch of
    batch_size sequences padded to max_len (the worst case). Base weights and activations are bf16 on CUDA
    (autocast), float32 on CPU; LoRA weights, their gradients and AdamW's two moments are float32.
    """
    cuda = cfg.device.startswith("cuda")
    a = 2 if cuda else 4  # bytes per base weight and per activation
    C, F_, H, V = args.dim, args.hidden_dim, args.n_heads, args.vocab_size
    Q, KV, tokens, targets = H * args.head_dim, args.n_kv_heads * args.head_dim, cfg.batch_size * cfg.max_len, \
        cfg.targets.split(",")
    io = dict(wq=(C, Q), wk=(C, KV), wv=(C, KV), wo=(Q, C), w1=(C, F_), w3=(C, F_), w2=(F_, C))  # (in, out)
    n_base = args.n_layers * (sum(i * o for i, o in io.values()) + 2 * C) + V * C * (2 - args.tie_embeddings) + C
    n_lora = args.n_layers * sum(cfg.r * sum(io[t]) for t in targets)
    # Saved per token by one block: each RMSNorm's input in float32 (on CUDA a float32 copy of the bf16 stream);
    # SDPA's q, k (after rotary), v, output and a float32 log-sum-exp per head (flash kernels: no (T, T) matrix);
    # the feed-forward's w1 x, silu(w1 x) and w3 x.
    block = 2 * 4 * C + a * (2 * Q + 2 * KV + 3 * F_) + 4 * H
    # LoRA keeps the input of each adapter and its (T, r) middle. With dropout each adapter keeps its own dropped
    # copy plus the mask (bool on CUDA; on CPU ATen's dropout multiplies by a float mask); without dropout,
    # adapters reading the same tensor (wq, wk, wv; w1, w3) share it.
    share = dict(wq="wq", wk="wq", wv="wq", wo="wo", w1="w1", w3="w1", w2="w2")
    kept = targets if cfg.dropout > 0 else {share[t] for t in targets}
    block += sum((a + (cfg.dropout > 0) * (1 if cuda else a)) * io[t][0] for t in kept) + a * cfg.r * len(targets)
    act = args.n_layers * tokens * block
    if cfg.grad_ckpt:  # checkpointing keeps only each block's input; backward recomputes one block at a time
        act = args.n_layers * tokens * a * C + tokens * block
    return [(f"base weights ({n_base / 1e9:.2f}B parameters, {'bf16' if cuda else 'float32'})", a * n_base),
            (f"LoRA ({n_lora / 1e6:.2f}M parameters): weights, gradients, AdamW moments", 16 * n_lora),
            (f"activations ({'checkpointed ' if cfg.grad_ckpt else ''}{cfg.batch_size} x {cfg.max_len} tokens)", act),
            ("backward: gradients in flight through one block", tokens * a * (3 * F_ + 2 * C)),
            # the head runs only where the loss is taken, ~4 answer tokens a sequence: logits, log-softmax, grads
            ("logits (N answer positions, vocab) float32", cfg.batch_size * 4 * V * 16)] \
        + [("CUDA context and allocator slack (estimate)", 2 ** 30)] * cuda


def parse_config(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        t = str(f.type)
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if "bool" in t else int if "int" in t else \
            float if "float" in t else str
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    p.add_argument("--resume", help="ckpt_last.pt to continue from, with its saved config (other flags ignored)")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (memory_plan) and exit")
    p.add_argument("--gpu-mem", type=float, help="with --dry-run: say whether the plan fits this many GiB")
    p.add_argument("--export-peft", metavar="DIR", help="write the adapter of --from as a Hugging Face peft adapter")
    p.add_argument("--export-merged", metavar="DIR", help="write --from merged into a full Hugging Face checkpoint")
    p.add_argument("--from", dest="src", metavar="CKPT", help="the checkpoint to export")
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config)})
    for k, v in RECIPES["cuda" if cfg.device.startswith("cuda") else "cpu"].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.model != "default":
        cfg.model = str(Path(cfg.model).resolve())
    return cfg, a


def print_plan(cfg: Config, gpu_mem: float | None = None):
    """Print memory_plan for cfg.model's config.json, in GiB, and whether it fits gpu_mem GiB."""
    folder = llama.default_model_dir() if cfg.model == "default" else Path(cfg.model)
    terms = memory_plan(llama.ModelArgs.from_hf(json.loads((folder / "config.json").read_text())), cfg)
    print(f"memory plan: {folder.name} on {cfg.device}, LoRA r={cfg.r} on {cfg.targets}, batch {cfg.batch_size} "
          f"x {cfg.max_len} tokens, dropout {cfg.dropout}, grad_ckpt {cfg.grad_ckpt}")
    for name, b in terms:
        print(f"  {b / 2 ** 30:8.3f} GiB  {name}")
    total = sum(b for _, b in terms) / 2 ** 30
    print(f"  {total:8.3f} GiB  total" + ("" if gpu_mem is None else
                                           f": {'fits' if total <= gpu_mem else 'does NOT fit'} in {gpu_mem} GiB"))


def export(src, peft_dir=None, merged_dir=None):
    """Write a train.py checkpoint for Hugging Face: a peft LoRA adapter (adapter_model.safetensors +
    adapter_config.json, loadable with peft's PeftModel.from_pretrained on LlamaForCausalLM) and/or a full
    checkpoint with the adapter merged in float32 and cast to the base dtype (config.json, model.safetensors and
    the tokenizer files of the base model). Names follow llama.ours_to_hf."""
    from safetensors.torch import save_file
    ckpt = lora.read_checkpoint(src)
    cfg = ckpt["config"]
    base = llama.default_model_dir() if cfg["model"] == "default" else Path(cfg["model"])
    if peft_dir:  # peft's names: base_model.model.<HF module>.lora_A.weight, A (r, in) and B (out, r) as ours
        Path(peft_dir).mkdir(parents=True, exist_ok=True)
        save_file({f"base_model.model.{llama.ours_to_hf(k)}.weight": v.contiguous() for k, v in ckpt["lora"].items()},
                  Path(peft_dir) / "adapter_model.safetensors", metadata={"format": "pt"})
        modules = [hf.split(".")[1] for ours, hf in llama.HF_NAMES.items() if ours.split(".")[-1] in cfg["targets"].split(",")]
        (Path(peft_dir) / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=cfg["r"],
            lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["dropout"], target_modules=modules, bias="none",
            fan_in_fan_out=False, inference_mode=True), indent=2))
    if merged_dir:
        hf_cfg = json.loads((base / "config.json").read_text())
        dtype = getattr(torch, hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32")
        model, _, _ = load_checkpoint(src, dtype=dtype)  # LoRALinear.merge: in float32, cast back to dtype
        tied = model.args.tie_embeddings
        state = {llama.ours_to_hf(k): v.contiguous() for k, v in model.state_dict().items()
                 if not k.endswith((".lora_A", ".lora_B")) and not (tied and k == "output.weight")}
        Path(merged_dir).mkdir(parents=True, exist_ok=True)
        save_file(state, Path(merged_dir) / "model.safetensors", metadata={"format": "pt"})
        for f in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json"):
            if (base / f).exists():
                shutil.copy(base / f, Path(merged_dir) / f)


def main(argv=None):
    cfg, a = parse_config(argv)
    if a.dry_run:
        return print_plan(cfg, a.gpu_mem)
    if a.export_peft or a.export_merged:
        return export(a.src, a.export_peft, a.export_merged)
    state = lora.read_checkpoint(a.resume) if a.resume else None
    if state:  # a resumed run is the saved run: same config, so the same batches and schedule
        cfg = Config(**state["config"])
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the {world} processes, so the "
                         f"global batch is the same as in one process")
    if world > 1:
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    main_proc, out = rank == 0, Path(cfg.out)
    log = print if main_proc else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    cuda = cfg.device.startswith("cuda")

    # Model: base weights frozen in bf16 on GPU (float32 on CPU), LoRA weights in float32.
    model, tok = llama.load(cfg.model, device=cfg.device, dtype=torch.bfloat16 if cuda else torch.float32)
    lora.apply_lora(model, cfg.targets.split(","), cfg.r, cfg.lora_alpha, cfg.dropout, verbose=main_proc)
    model.checkpointing = cfg.grad_ckpt
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    # Data: instructions for every utterance, encoded once.
    names = data.datasets_for(cfg.data, cfg.data_dir)
    descriptions = data.load_descriptions(cfg.descriptions) if cfg.descriptions else None
    train, dev = [], []
    for name in names:
        train += data.build_examples(data.load_split(name, "train", cfg.data_dir), cfg.window, descriptions)
        dev += data.build_examples(data.load_split(name, "dev", cfg.data_dir), cfg.window, descriptions)
    if descriptions:
        log(f"{sum(e['has_description'] for e in train + dev)} of {len(descriptions)} descriptions matched an utterance")
    dev = random.Random(cfg.seed).sample(dev, cfg.dev_limit) if cfg.dev_limit and cfg.dev_limit < len(dev) else dev
    encoded = [data.encode_example(tok, ex, cfg.max_len) for ex in train]
    lengths = [len(ids) for ids, _ in encoded]
    per_epoch = math.ceil(len(lengths) / cfg.batch_size) // cfg.grad_accum
    epoch_batches = functools.lru_cache(maxsize=1)(lambda e: make_batches(lengths, cfg.batch_size, cfg.seed + e))
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    log(f"{len(train)} train / {len(dev)} dev examples of {','.join(names)}; {per_epoch} steps per epoch, "
        f"{total} steps; mean length {sum(lengths) / len(lengths):.0f} tokens")

    step, best = 0, -1.0
    out.mkdir(parents=True, exist_ok=True)
    if state:  # lr and dropout masks are functions of the step, and the batches of (seed, step): no RNG state
        lora.load_lora_state_dict(model, state["lora"], a.resume)
        opt.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        if main_proc and (out / "metrics.jsonl").exists():  # drop rows a killed run logged after its checkpoint
            rows = (out / "metrics.jsonl").read_text().splitlines()
            (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))
        log(f"resumed from {a.resume} at step {step}")
    meta = dict(config=asdict(cfg), model_args=asdict(model.args), labels={n: data.LABELS[n] for n in names})

    def save(path, **extra):
        if main_proc:
            atomic_save(dict(meta, lora=lora.lora_state_dict(model), step=step, best=best, **extra), out / path)

    def evaluate():
        model.eval()
        rows = predict(model, tok, dev[rank::world], cfg.max_len, progress=main_proc)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [r for g in gathered for r in g]
        model.train()
        raw = report(rows)
        bias = calibrate(rows) if cfg.calibrate else None
        res = report(rows)
        pick = lambda r: r.get("union", r[names[0]])
        return dict(pick(res), uncalibrated_weighted_f1=pick(raw)["weighted_f1"]), bias

    metrics_log = open(out / "metrics.jsonl", "a") if main_proc else None
    model.train()
    bar = tqdm(total=total, initial=step, disable=not main_proc, desc="train")
    t0, tokens = time.time(), 0
    while step < total:
        epoch, k = divmod(step, per_epoch)
        batches = epoch_batches(epoch)[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]  # shuffled once per epoch
        n_answer = sum(encoded[i][1] for b in batches for i in b)  # normalise by the whole step's answer tokens
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=cfg.device)
        for j in range(rank, len(batches), world):  # this process's share of the step's micro-batches
            torch.manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + j)  # LoRA dropout: same in any world
            x, where, targets = collate([encoded[i] for i in batches[j]], tok.pad_id, cfg.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x, logits_at=where)  # (N, vocab): the head only where the loss is taken
            loss = F.cross_entropy(logits, targets, reduction="sum") / n_answer
            loss.backward()
            loss_sum += loss.detach()
            tokens += x.numel()
        if world > 1:
            for p_ in params:
                dist.all_reduce(p_.grad)
            dist.all_reduce(loss_sum)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum.item()} at step {step + 1}; stopped, keeping the last good "
                                     f"checkpoint {out / 'ckpt_last.pt'}")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        rate = tokens * world / (time.time() - t0)
        bar.update()
        bar.set_postfix(loss=f"{loss_sum.item():.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        row = dict(step=step, loss=loss_sum.item(), lr=lr, tokens_per_s=round(rate, 1))
        end_of_epoch = step % per_epoch == 0 or step == total
        if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) or step == total:
            res, bias = evaluate()
            row.update(dev_weighted_f1=res["weighted_f1"], dev_accuracy=res["accuracy"],
                       dev_uncalibrated_weighted_f1=res["uncalibrated_weighted_f1"])
            log(f"\nstep {step}: dev weighted F1 {100 * res['weighted_f1']:.2f} "
                f"(uncalibrated {100 * res['uncalibrated_weighted_f1']:.2f}), accuracy {100 * res['accuracy']:.2f}")
            if res["weighted_f1"] > best:
                best = res["weighted_f1"]
                save("ckpt.pt", dev=res, label_bias=bias)
        if main_proc:
            metrics_log.write(json.dumps(row) + "\n")
            metrics_log.flush()
        if step % cfg.save_every == 0 or step == total:
            save("ckpt_last.pt", optimizer=opt.state_dict())
    bar.close()
    log(f"done: best dev weighted F1 {100 * best:.2f}; adapter in {out / 'ckpt.pt'}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
