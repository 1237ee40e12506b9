"""Instruction-tune a LLaMA model with LoRA for emotion recognition in conversations (DialogueLLM).

    python train.py --data meld                      # embedded SmolLM2-135M, CPU recipe
    python train.py --data meld --model /path/Llama-2-7b-hf   # on a GPU: the paper's recipe
    torchrun --nproc_per_node 2 train.py ...          # data-parallel

Every default lives once, in Config; fields left None are filled from RECIPES by device (see README).
"""
import argparse
import json
import math
import os
import random
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
from eval import calibrate, predict, report


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


def parse_config(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        t = str(f.type)
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if "bool" in t else int if "int" in t else \
            float if "float" in t else str
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    p.add_argument("--resume", help="ckpt_last.pt to continue from")
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config)})
    for k, v in RECIPES["cuda" if cfg.device.startswith("cuda") else "cpu"].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.model != "default":
        cfg.model = str(Path(cfg.model).resolve())
    return cfg, a.resume


def main(argv=None):
    cfg, resume = parse_config(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
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
    dev = random.Random(cfg.seed).sample(dev, cfg.dev_limit) if cfg.dev_limit and cfg.dev_limit < len(dev) else dev
    encoded = [data.encode_example(tok, ex, cfg.max_len) for ex in train]
    lengths = [len(ids) for ids, _ in encoded]
    per_epoch = len(make_batches(lengths, cfg.batch_size, 0)) // cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    log(f"{len(train)} train / {len(dev)} dev examples of {','.join(names)}; {per_epoch} steps per epoch, "
        f"{total} steps; mean length {sum(lengths) / len(lengths):.0f} tokens")

    step, best = 0, -1.0
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, best = state["step"], state["best"]
        log(f"resumed from {resume} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
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
        batches = make_batches(lengths, cfg.batch_size, cfg.seed + epoch)[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
        n_answer = sum(encoded[i][1] for b in batches for i in b)  # normalise by the whole step's answer tokens
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=cfg.device)
        for b in batches[rank::world]:
            x, where, targets = collate([encoded[i] for i in b], tok.pad_id, cfg.device)
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
            raise FloatingPointError(f"loss is {loss_sum.item()} at step {step}; the last good checkpoint is "
                                     f"{out / 'ckpt_last.pt'}")
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
            save("ckpt_last.pt", optimizer=opt.state_dict(), rng=torch.get_rng_state())
    bar.close()
    log(f"done: best dev weighted F1 {100 * best:.2f}; adapter in {out / 'ckpt.pt'}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
