"""bench.py smoke tests: the tiny-config path of every command runs both sides and writes its JSON (no timing
checks); the attention paths that bench.py gpu relies on (llama.attend) agree."""
import functools
import json

import pytest
import torch

import bench
import cli
import convert
import llama
from conftest import REQUIRE


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def needs_reference(row: dict) -> None:
    """Skip when a row lacks transformers + peft (test-only dependencies); under DIALOGUELLM_REQUIRE_DATA=1, fail."""
    if bench.MISSING_REF in row.get("error", ""):
        (pytest.fail if REQUIRE else pytest.skip)(row["error"])


def tiny_model() -> llama.Transformer:
    """A random float32 model with grouped heads (4 query heads, 2 kv heads), in eval mode; no file, no library."""
    torch.manual_seed(0)
    args = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=512)
    model = llama.Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model.eval()


@pytest.mark.parametrize("masked", [True, False])
def test_grouped_heads_repeated_or_not_give_the_same_attention(masked):
    """llama.attend repeats the kv heads on CUDA under a mask (keeping a fast kernel) and passes them grouped
    elsewhere: both ways give the same output and gradients, float32 within 1e-6."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 16, generator=g, requires_grad=True)  # (B, H, T, D)
    k = torch.randn(3, 2, 7, 16, generator=g, requires_grad=True)  # (B, K, S, D): 2 query heads per kv head
    v = torch.randn(3, 2, 7, 16, generator=g, requires_grad=True)
    mask = torch.ones(3, 1, 5, 7, dtype=torch.bool).tril(2) if masked else None  # (B, 1, T, S)
    if masked:
        mask[1, :, :, :2] = False  # row 1's first 2 keys are padding (each query still sees one)
    outputs = []
    for repeat in (False, True):
        y = llama.attend(q, k, v, mask, repeat_kv=repeat)
        outputs.append((y, *torch.autograd.grad((y * y).sum(), (q, k, v))))
    for grouped, repeated in zip(*outputs):
        assert maxdiff(grouped, repeated) < 1e-6


def test_cpu_attention_on_bfloat16_runs_in_float32():
    """On the CPU, attend computes bf16 (as autocast gives it) in float32 (the bf16 flash kernel's backward is 3x
    slower): the output is the float32 attention of the same bf16 inputs, rounded once to bf16, and the gradients
    reach the bf16 inputs in bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g),
               torch.randn(2, 2, 7, 16, generator=g))
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(2)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llama.attend(q16, k16, v16, mask)
    want = llama.attend(q16.detach().float(), k16.detach().float(), v16.detach().float(), mask)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.bfloat16())
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q16, k16, v16))


def test_model_with_repeated_kv_heads_equals_grouped(monkeypatch):
    """The whole model, padded rows after a shared cached prefix (the masked path of training and scoring), gives
    the same logits with either attention path forced."""
    model = tiny_model()
    tokens = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    attend, logits = llama.attend, []
    for repeat in (False, True):
        monkeypatch.setattr(llama, "attend", functools.partial(attend, repeat_kv=repeat))
        cache = llama.KVCache(model.args.n_layers)
        with torch.no_grad():
            model(tokens[:1, :3], cache=cache)  # (1, 3) prefix, its keys and values broadcast to both rows
            cache.grow = False
            logits.append(model(tokens[:, 3:], mask=mask[:, 3:], cache=cache))
    assert maxdiff(*logits) < 1e-6


def test_bench_all_tiny_writes_json(tmp_path, monkeypatch):
    try:
        convert.model_dir("default")  # the tiny model borrows the default tokenizer
    except cli.MissingError as e:
        (pytest.fail if REQUIRE else pytest.skip)(str(e))
    monkeypatch.setenv("DIALOGUELLM_DATA", str(tmp_path / "no-data"))  # exercises the synthetic-prompt fallback
    bench.main(["all", "--tiny", "--steps", "1", "--warmup", "1", "--n-eval", "2", "--out", str(tmp_path)])
    reports = {cmd: json.loads((tmp_path / f"bench-{cmd}.json").read_text()) for cmd in ("train", "eval", "load")}
    for cmd, r in reports.items():
        assert r["command"] == cmd and r["machine"]["torch"] and r["results"], cmd
    train = reports["train"]
    assert train["settings"]["source"].startswith("SYNTHETIC")
    assert train["results"]["ours"]["tokens_per_s"] > 0 and train["results"]["ours"]["peak_rss_mb"] > 0
    needs_reference(train["results"]["transformers_peft"])
    # Same model, batch and a fresh adapter (B = 0): both stacks must start from the same loss.
    assert abs(train["results"]["ours"]["first_loss"] - train["results"]["transformers_peft"]["first_loss"]) < 1e-3
    check_roofline(train)
    assert reports["eval"]["results"]["naive"]["agreement_with_score"] == 1.0
    assert reports["load"]["results"]["ours"]["peak_rss_mb"] > 0


def check_roofline(report: dict) -> None:
    """Recompute bench train's roofline from the JSON's own numbers: the model FLOPs from the tiny shape (issue 24:
    4 x the linear weights x the rows ours computes, + 4 x the head at the answer rows), the roofline from the
    matmul rates, each side's fraction from its step time, and the goals from the results."""
    roof, res, goals = report["roofline"], report["results"], report["goals"]
    tiny, vocab = bench.TINY, roof["matmuls"][-1]["N"]
    dim, hidden, kv = tiny["hidden_size"], tiny["intermediate_size"], tiny["num_key_value_heads"] * tiny["head_dim"]
    q = tiny["num_attention_heads"] * tiny["head_dim"]
    per_row = tiny["num_hidden_layers"] * (2 * dim * q + 2 * dim * kv + 3 * dim * hidden)
    rows = roof["rows"]
    assert rows["shared_prefix"] > 0 and rows["answer"] > 0
    flops = 4 * per_row * (rows["shared_prefix"] + rows["after_prefix"]) + 4 * dim * vocab * rows["answer"]
    assert roof["model_flops_per_step"] == flops == sum(mm["flops"] for mm in roof["matmuls"])
    for dtype in ("float32", "bfloat16"):
        seconds = sum(mm["flops"] / (mm["gflops_per_s"][dtype] * 1e9) for mm in roof["matmuls"])
        assert roof[dtype]["gflops_per_s"] == pytest.approx(flops / seconds / 1e9, rel=1e-9)
    for side, r in res.items():
        achieved = flops / r["sec_per_step"] / 1e9
        assert r["achieved_gflops_per_s"] == pytest.approx(achieved, rel=1e-9), side
        assert r["roofline_fraction"] == pytest.approx(achieved / roof[r["dtype"]]["gflops_per_s"], rel=1e-9), side
    ours, ref = res["ours"], res["transformers_peft"]
    assert ours["dtype"] == ref["dtype"] == "float32" and ours["tokens_computed"] < ref["tokens_computed"]
    assert goals["roofline_fraction"] == ours["roofline_fraction"]
    assert goals["speedup"] == ours["tokens_per_s"] / ref["tokens_per_s"]
    assert goals["peak_rss_ratio"] == ours["peak_rss_mb"] / ref["peak_rss_mb"]
    bf16_host = any(f in report["machine"]["cpu_flags"] for f in bench.BF16_UNITS)
    assert ("bf16_vs_float32" in goals) == bf16_host == ("ours_bfloat16" in res)
    if bf16_host:
        assert res["ours_bfloat16"]["dtype"] == "bfloat16"
        assert goals["bf16_vs_float32"] == res["ours_bfloat16"]["tokens_per_s"] / ours["tokens_per_s"]


def test_bench_gpu_runs_on_cpu_from_its_carried_folder(tmp_path, monkeypatch, data_dir, shared_models):
    """`gpu` reads only bench-gpu/ (MELD's CSVs, LLaMA-2's tokenizer): a tiny-shape smoke test of its code path."""
    monkeypatch.setattr(bench, "GPU_ASSETS", tmp_path / "bench-gpu")
    tokenizer = shared_models / "llama2-tokenizer" / "tokenizer.model"
    bench.main(["gpu", "--prepare", "--tokenizer", str(tokenizer), "--out", str(tmp_path)])
    monkeypatch.setenv("DIALOGUELLM_DATA", str(tmp_path / "no-data"))  # nothing but the carried folder
    bench.main(["gpu", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench-gpu.json").read_text())
    rows = report["results"]
    needs_reference(rows["transformers_peft 256 auto"])
    assert len(rows) == 9 and all(r["fits_40GB"] for k, r in rows.items() if k != "correctness 256 auto"), rows
    for length in (256, 512):
        for ckpt in ("auto", "all"):
            ours, ref = rows[f"ours {length} {ckpt}"], rows[f"transformers_peft {length} {ckpt}"]
            # The same random weights and the same nonzero adapter give the same loss: float32 agrees to ~1e-6,
            # while a wrong rotary table (as to_empty() once left transformers') is off by 4e-5 to 5e-4.
            assert ours["lora_loss"] == pytest.approx(ref["lora_loss"], abs=1e-5)
            assert ours["base_loss"] == pytest.approx(ref["base_loss"], abs=1e-5)
            # ...and the adapter moves the loss by far more than that, so the comparison covers LoRA itself.
            assert abs(ours["lora_loss"] - ours["base_loss"]) > 1e-3
        ours = rows[f"ours {length} all"]
        assert ours["blocks"] == 4 and ours["window"] > 0
    check = rows["correctness 256 auto"]
    assert check["difference"] == check["ours_loss"] - check["transformers_peft_loss"]
    assert check["ours_loss"] == rows["ours 256 auto"]["lora_loss"] and check["dtype"] == "float32"


def test_bench_gpu_keeps_rows_and_records_a_failed_worker(tmp_path, monkeypatch):
    """A worker that dies leaves its error in its row, and every finished row is on disk before the next starts."""
    written = []
    real_write = bench.write_report

    def spawn(worker, a):
        written.append(json.loads((tmp_path / "bench-gpu.json").read_text()) if written else None)
        if a["side"] == "transformers_peft":
            raise RuntimeError("bench worker gpu_train failed (exit 1):\nModuleNotFoundError: No module named 'peft'")
        return dict(fits_40GB=True, lora_loss=1.0, base_loss=2.0)
    monkeypatch.setattr(bench, "spawn", spawn)
    monkeypatch.setattr(bench, "widened_batch", lambda tok, dialogues, length: ([([1] * length, 1)] * 4, 2))
    monkeypatch.setattr(bench.llama, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(bench.data, "load_split", lambda *args: [])
    monkeypatch.setattr(bench, "write_report", real_write)
    bench.main(["gpu", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench-gpu.json").read_text())["results"]
    assert "No module named 'peft'" in rows["transformers_peft 512 all"]["error"]
    assert rows["ours 512 all"]["lora_loss"] == 1.0 and "error" in rows["correctness 256 auto"]
    assert [len(w["results"]) for w in written[1:]] == list(range(1, 8))  # each spawn found the rows before it
