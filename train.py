"""Instruction-tune a LLaMA model with LoRA for emotion recognition in conversations (DialogueLLM).

    python train.py --data meld                                # embedded SmolLM2-135M, CPU recipe
    python train.py --data meld --model /path/Llama-2-7b-hf    # GPU: the authors' released recipe
    torchrun --nproc_per_node 2 train.py ...                   # data parallel
    python train.py --dry-run --model DIR --gpu-mem 24         # the memory the run needs
    python train.py --grad-ckpt auto|all|none|N --dtype bfloat16  # checkpointing; base precision
    python train.py --resume runs/meld/ckpt_last.pt            # continue a stopped run exactly
    python train.py --export-peft DIR --from runs/meld/ckpt.pt # or --export-merged DIR: full HF
    python train.py --export-merged DIR --from CKPT --dtype float32 --shard-size 5  # GB per shard

DialogueLLM (Zhang et al. 2023, arXiv 2310.11374, Sec. 3): one instruction per utterance, the loss
on the answer (label + EOS) only. Every default lives once, in Config; fields left None come from
RECIPES."""
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

import cli
import convert
import data
import llama
import lora
import memory
from convert import save_checkpoint
from data import MAX_LEN, WINDOW
from eval import calibrated_report, predict

# ---------------------------------------------------------------- config

@dataclass
class Config:
    data: str = "meld"  # meld, emorynlp, iemocap, a comma list, or all
    data_dir: str | None = None
    model: str = "default"  # "default" (SmolLM2-135M-Instruct), a HF folder, or a repo id in the local HF cache
    out: str = "runs/meld"
    descriptions: str | None = None  # video descriptions JSONL
    window: int = WINDOW  # previous utterances in the prompt
    max_len: int = MAX_LEN  # prompt + answer tokens
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
    grad_ckpt: str | None = None  # activation checkpointing: auto, all, none, or a number of blocks
    gpu_mem: float | None = None  # GiB --grad-ckpt auto and --dry-run plan for (None: free memory)
    dtype: str | None = None  # base weights and autocast: auto (cli.auto_dtype), float32, bfloat16
    max_steps: int = 0  # stop after this many optimizer steps (0: the epochs decide)
    eval_every: int = 0  # dev evaluation every N steps (0: at the end of each epoch)
    dev_limit: int | None = None  # dev utterances used for model selection (None: all)
    calibrate: bool = True  # fit label offsets on dev (eval.fit_offsets), kept in ckpt.pt
    save_every: int = 50  # steps between ckpt_last.pt writes
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

# On a GPU the authors' released scripts (LLaMA-2-7B, bf16; the paper itself states r=4, alpha 16, 10 epochs,
# batch 128); on CPU a budget recipe for the 135M default model: 2 epochs of MELD in about 1 h 25 min on 2 cores,
# in float32: --dtype auto (bf16 where the CPU has bf16 units) ran 1.5x faster but lost 1.7 MELD test points (README).
RECIPES = {
    "cuda": dict(targets="wq,wv", r=8, lora_alpha=64, lr=3e-4, warmup=100, epochs=3, batch_size=4, grad_accum=15,
                 grad_ckpt="auto", dtype="bfloat16"),
    "cpu": dict(targets="wq,wk,wv,wo,w1,w2,w3", r=16, lora_alpha=32, lr=1e-3, warmup=30, epochs=2, batch_size=8,
                grad_accum=2, grad_ckpt="none", dtype="float32"),
}
DTYPES = ("auto", "float32", "bfloat16")

RUN_FILES = ("ckpt.pt", "ckpt_last.pt", "metrics.jsonl")
RESUME_KEYS = ("config", "lora", "optimizer", "step", "best")

def with_recipe(cfg: Config) -> Config:
    """cfg with the fields left None taken from its device's recipe (RECIPES), and --dtype auto
    resolved (and said) once here, so the checkpoint's config holds the dtype that ran and
    evaluation loads that one."""
    recipe = RECIPES["cuda"] if cfg.device.startswith("cuda") else RECIPES["cpu"]
    for key, value in recipe.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.dtype == "auto":
        cfg.dtype, why = cli.auto_dtype(cfg.device)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--dtype auto: {cfg.dtype}, as {why}")
    return cfg

def parse_config(argv=None) -> tuple[Config, argparse.Namespace]:
    """The run's Config (flags, then the device's recipe for fields left None) and the other flags;
    checked before any work."""
    p = cli.train_parser(__doc__.split("\n")[0], Config)
    a = p.parse_args(argv)
    cfg = with_recipe(Config(**{f.name: getattr(a, f.name) for f in fields(Config)}))
    if cfg.model != "default":  # a folder, or a Hub repo id pinned to the snapshot it resolves to now
        cfg.model = str(convert.model_dir(cfg.model).resolve())
    if not cfg.out.strip():
        raise cli.UsageError("--out is empty; give the run's folder (an unset variable?)")
    for key in ("data_dir", "descriptions"):  # absolute, so --resume from another folder reads the same files
        if getattr(cfg, key):
            setattr(cfg, key, str(Path(getattr(cfg, key)).resolve()))
    cli.check_names("--targets", cfg.targets.split(","), lora.TARGETS)
    cli.check_names("--dtype", [cfg.dtype], DTYPES)
    cli.check_names("--data", cfg.data.split(","), (*data.DATASETS, "all"))
    return cfg, a

# ---------------------------------------------------------------- set-up

def load_model(cfg: Config, log):
    """The base model frozen in cfg.dtype with float32 LoRA adapters, in training mode,
    checkpointing the blocks that checkpointed_blocks picks; its tokenizer; AdamW over the
    adapters."""
    torch.manual_seed(cfg.seed)  # the adapters' initial A
    folder = convert.model_dir(cfg.model)
    blocks = memory.checkpointed_blocks(cfg, llama.read_args(folder), log)  # before loading
    model, tok = llama.load(folder, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    lora.apply_lora(model, cfg.targets.split(","), cfg.r, cfg.lora_alpha, cfg.dropout, verbose=log is print)
    model.checkpointing = blocks
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    return model.train(), tok, opt

# ---------------------------------------------------------------- data

def load_data(cfg: Config, tok, log):
    """(dataset names, dev examples, train examples encoded once, steps per epoch, total steps)."""
    names = data.datasets_for(cfg.data, cfg.data_dir)
    descriptions = data.load_descriptions(cfg.descriptions) if cfg.descriptions else None
    train, dev = [], []
    for name in names:
        train += data.build_examples(data.load_split(name, "train", cfg.data_dir), cfg.window, descriptions)
        dev += data.build_examples(data.load_split(name, "dev", cfg.data_dir), cfg.window, descriptions)
    if descriptions:
        matched = sum(e["has_description"] for e in train + dev)
        log(f"{matched} of {len(descriptions)} descriptions matched an utterance")
    if cfg.dev_limit and cfg.dev_limit < len(dev):
        dev = random.Random(cfg.seed).sample(dev, cfg.dev_limit)
    encoded = [data.encode_example(tok, ex, cfg.max_len) for ex in train]
    mean = sum(len(ids) for ids, _ in encoded) / max(1, len(encoded))
    per_epoch, total = count_steps(cfg, len(encoded))
    log(f"{len(train)} train / {len(dev)} dev examples of {','.join(names)}; mean length {mean:.0f} tokens; "
        f"{per_epoch} steps per epoch, {total} steps")
    return names, dev, encoded, per_epoch, total

def count_steps(cfg: Config, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); UserError if the data or schedule give no step."""
    per_epoch = math.ceil(n_train / cfg.batch_size) // cfg.grad_accum
    if per_epoch == 0:
        raise cli.UserError(f"{n_train} training examples make no optimizer step of --batch-size {cfg.batch_size}"
                            f" x --grad-accum {cfg.grad_accum}")
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    if total == 0:
        raise cli.UsageError(f"--epochs {cfg.epochs} of {per_epoch} steps makes no optimizer step")
    return per_epoch, total

def make_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort chunks of 64 batches by length, cut, shuffle."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 64
    grouped = []
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start:start + chunk], key=lengths.__getitem__)
    batches = [grouped[s:s + batch_size] for s in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches

def collate(encoded: list[tuple[list[int], int]], pad_id: int, device):
    """Right-pad (ids, n_answer) pairs: tokens (B, T) int64, `where` (B, T) bool at the positions
    that predict an answer token (label ids, EOS), and those tokens (N,). The answer is marked from
    lengths, never from pad ids, so the EOS survives when pad_id == eos_id."""
    T = max(len(ids) for ids, _ in encoded)
    x = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    answer = torch.zeros(len(encoded), T, dtype=torch.bool)  # True at the answer tokens themselves
    for i, (ids, n_answer) in enumerate(encoded):
        x[i, :len(ids)] = torch.tensor(ids)
        answer[i, len(ids) - n_answer:len(ids)] = True
    targets = x[answer]  # (N,)
    return x.to(device), predicting(answer).to(device), targets.to(device)

def predicting(at: torch.Tensor) -> torch.Tensor:
    """The next-token shift, in one place: the positions (B, T) bool whose next token `at` marks."""
    return torch.cat([at[:, 1:], torch.zeros_like(at[:, :1])], dim=1)

# ---------------------------------------------------------------- the loop

def get_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine to lr/10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

def answer_loss(model, x: torch.Tensor, where: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's loss, plainly: the model on the batch x (B, T), cross-entropy summed over the
    answer tokens `targets` (N,) that the positions `where` (B, T) predict. Training computes the
    same logits faster with forward_shared; tests/test_train.py holds that path to this one."""
    return F.cross_entropy(model(x, logits_at=where), targets, reduction="sum")

def shared_length(x: torch.Tensor, where: torch.Tensor) -> int:
    """How many leading positions every row of x (B, T) shares, stopping before the first position
    where a row's loss is taken (`where`, (B, T) bool): at least the instruction header, more when
    rows share context."""
    same = (x == x[:1]).all(0)  # (T,) every row has the first row's token here
    no_loss = ~where.any(0)  # (T,) no row takes its loss here
    leading = (same & no_loss).int().cumprod(0)  # (T,) 1 up to the first position that fails
    return int(leading.sum())

def forward_shared(model, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) float32 at the N positions `where` of x (B, T), as model(x, logits_at=where)
    computes them, with the rows' shared prefix (shared_length, P tokens) run once as one row: its
    keys and values (1, K, P, D) are broadcast to every row, and every row's gradient flows back
    through that one computation. LoRA dropout on the prefix draws one mask for all rows: each row
    still sees dropout at the same rate, the rows one sample."""
    P = shared_length(x, where)
    if P == 0 or x.shape[0] == 1:
        return model(x, logits_at=where)
    prefix = llama.KVCache(model.args.n_layers)
    model(x[:1, :P], cache=prefix, logits_at=where[:1, :P])  # (1, P): (0, V) logits
    prefix.grow = False  # the rows attend to the prefix but do not extend it
    return model(x[:, P:], cache=prefix, logits_at=where[:, P:])  # positions P..T-1

@dataclass
class Run:
    """What every step of a run shares: its config, its training examples (ids, n_answer), the pad
    id, and this process's place among `world` data-parallel processes."""
    cfg: Config
    encoded: list[tuple[list[int], int]]
    pad_id: int
    world: int = 1
    rank: int = 0

def seed_dropout(cfg: Config, step: int, j: int) -> None:
    """Seed the LoRA dropout of micro-batch j of `step`: its masks depend on (seed, step, j) alone,
    so they are the same in any number of processes and after a resume."""
    micro_batch = step * cfg.grad_accum + j  # its index in the whole run
    torch.manual_seed(cfg.seed * 1_000_003 + micro_batch)

def micro_batch_loss(model, batch: list[tuple[list[int], int]], run: Run) -> torch.Tensor:
    """answer_loss of one micro-batch, its logits from forward_shared (the header run once)."""
    x, where, targets = collate(batch, run.pad_id, run.cfg.device)
    device_type = torch.device(run.cfg.device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=run.cfg.dtype == "bfloat16"):
        logits = forward_shared(model, x, where)  # (N, V): the head only where the loss is taken
    return F.cross_entropy(logits, targets, reduction="sum")

def optimizer_step(model, opt, run: Run, batches: list[list[int]], step: int, lr: float) -> tuple[float, int]:
    """One AdamW step over this process's share of the step's micro-batches: (loss, tokens covered:
    every row's prompt and answer, in all processes). The loss is summed over answer tokens and
    divided by those of the whole step, so accumulation equals one big batch. UserError, before the
    adapter changes, if the loss is not finite."""
    for group in opt.param_groups:
        group["lr"] = lr
    n_answer = sum(run.encoded[i][1] for batch in batches for i in batch)
    mine = range(run.rank, len(batches), run.world)  # this process's micro-batches
    loss_sum = torch.zeros((), device=run.cfg.device)
    for j in mine:
        seed_dropout(run.cfg, step, j)
        loss = micro_batch_loss(model, [run.encoded[i] for i in batches[j]], run) / n_answer
        loss.backward()
        loss_sum += loss.detach()
    params = [p for group in opt.param_groups for p in group["params"]]
    if run.world > 1:
        for p in params:
            dist.all_reduce(p.grad)
        dist.all_reduce(loss_sum)
    last = Path(run.cfg.out) / "ckpt_last.pt"  # named when a non-finite step stops the run
    cli.check_finite(last, step, loss=loss_sum)
    torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    cli.check_finite(last, step, params=params)
    tokens = sum(len(run.encoded[i][0]) for j in mine for i in batches[j]) * run.world
    return loss_sum.item(), tokens

# ---------------------------------------------------------------- evaluation and saving

def evaluate_dev(model, tok, dev, run: Run, names: list[str], batch: int = memory.EVAL_BATCH):
    """Dev metrics for model selection (the union's when several datasets) and the label offsets
    fitted on these predictions; `batch` prompts are scored at once (memory.eval_batch)."""
    model.eval()
    rows = predict(model, tok, dev[run.rank::run.world], run.cfg.max_len, batch, progress=run.rank == 0)
    if run.world > 1:
        gathered = [None] * run.world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    model.train()
    report, bias = calibrated_report(rows, fit=run.cfg.calibrate)
    key = "union" if len(names) > 1 else names[0]
    res = dict(report[key], uncalibrated_weighted_f1=report["uncalibrated_weighted_f1"][key])
    if run.rank == 0:
        print(f"\ndev weighted F1 {100 * res['weighted_f1']:.2f} (uncalibrated "
              f"{100 * res['uncalibrated_weighted_f1']:.2f}), accuracy {100 * res['accuracy']:.2f}")
    return res, bias

def dev_checkpoint(model, tok, dev, run: Run, names, batch: int, meta: dict, row: dict, best: float):
    """Evaluate on dev into the log row; write ckpt.pt if the weighted F1 beats `best` (a tie keeps the
    earlier step). Returns the new best."""
    res, bias = evaluate_dev(model, tok, dev, run, names, batch)
    row.update({f"dev_{key}": res[key] for key in ("weighted_f1", "accuracy", "uncalibrated_weighted_f1")})
    if res["weighted_f1"] > best and run.rank == 0:
        path = Path(run.cfg.out) / "ckpt.pt"
        save_checkpoint(path, dict(meta, step=row["step"], best=res["weighted_f1"]), model, dev=res, label_bias=bias)
    return max(best, res["weighted_f1"])

@cli.releasing_locks
def main(argv=None):
    cfg, a = parse_config(argv)
    if a.export_peft or a.export_merged:
        return convert.export(a.src, a.export_peft, a.export_merged, a.dtype, a.shard_size, a.overwrite)
    state = cli.read_checkpoint(a.resume, RESUME_KEYS) if a.resume else None
    if state:  # a resumed run is the saved run: same config, so the same batches and schedule
        cfg = with_recipe(Config(**cli.saved_config(state, a, Config)))  # new fields: the recipe's
    if a.dry_run:
        return memory.print_plan(cfg)
    cli.check_device(cfg.device)
    out = Path(cfg.out)
    world, rank = cli.setup_distributed(cfg)  # torchrun's processes, if several
    if rank == 0:  # one run, one folder: locked until the run ends
        cli.claim_run_folder(out, RUN_FILES, a.overwrite, resume=bool(state))
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    model, tok, opt = load_model(cfg, log)
    names, dev, encoded, per_epoch, total = load_data(cfg, tok, log)
    dev_batch = memory.eval_batch(model.args, cfg, log)
    run = Run(cfg, encoded, tok.pad_id, world, rank)
    step, best = convert.resume_run(state, model, opt, out, rank == 0) if state else (0, -1.0)
    meta = dict(config=asdict(cfg), model_args=asdict(model.args), labels={n: data.LABELS[n] for n in names})
    metrics_log = open(out / "metrics.jsonl" if rank == 0 else os.devnull, "a")  # a row per step
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train")
    first = step
    t0, tokens = time.time(), 0
    stop = cli.StopRequest(lambda: cli.resume_hint(out / "ckpt_last.pt"))  # Ctrl-C, SIGTERM
    while step < total:
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == first:  # shuffled and length-grouped once per epoch
            batches = make_batches([len(ids) for ids, _ in encoded], cfg.batch_size, cfg.seed + epoch)
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        step_batches = batches[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
        loss, n_tokens = optimizer_step(model, opt, run, step_batches, step, lr)
        step += 1
        tokens += n_tokens
        row = dict(step=step, loss=loss, lr=lr, tokens_per_s=round(tokens / (time.time() - t0), 1))
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step == total or step % (cfg.eval_every or per_epoch) == 0:  # else at epoch ends
            best = dev_checkpoint(model, tok, dev, run, names, dev_batch, meta, row, best)
        print(json.dumps(row), file=metrics_log, flush=True)
        if rank == 0 and (step % cfg.save_every == 0 or step == total or stop):
            save_checkpoint(out / "ckpt_last.pt", dict(meta, step=step, best=best), model, optimizer=opt.state_dict())
        stop.exit_if_asked(f"after step {step}: {cli.resume_hint(out / 'ckpt_last.pt')}")
    bar.close()
    log(f"done: best dev weighted F1 {100 * best:.2f}; adapter in {out / 'ckpt.pt'}")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    cli.run(main)
