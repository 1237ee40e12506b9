"""bench.py smoke test: the tiny-config path of every command runs both sides and writes its JSON (no timing checks)."""
import json

import pytest

import bench
import cli
import convert


def test_bench_all_tiny_writes_json(tmp_path, monkeypatch):
    try:
        convert.model_dir("default")  # the tiny model borrows the default tokenizer
    except cli.MissingError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("DIALOGUELLM_DATA", str(tmp_path / "no-data"))  # exercises the synthetic-prompt fallback
    bench.main(["all", "--tiny", "--steps", "1", "--warmup", "1", "--n-eval", "2", "--out", str(tmp_path)])
    reports = {cmd: json.loads((tmp_path / f"bench-{cmd}.json").read_text()) for cmd in ("train", "eval", "load")}
    for cmd, r in reports.items():
        assert r["command"] == cmd and r["machine"]["torch"] and r["results"], cmd
    train = reports["train"]
    assert train["settings"]["source"].startswith("SYNTHETIC")
    assert train["results"]["ours"]["tokens_per_s"] > 0 and train["results"]["ours"]["peak_rss_mb"] > 0
    # Same model, batch and a fresh adapter (B = 0): both stacks must start from the same loss.
    ref = train["results"]["transformers_peft"]
    if "error" not in ref:
        assert abs(train["results"]["ours"]["first_loss"] - ref["first_loss"]) < 1e-3
    assert reports["eval"]["results"]["naive"]["agreement_with_score"] == 1.0
    assert reports["load"]["results"]["ours"]["peak_rss_mb"] > 0


def test_bench_gpu_runs_on_cpu_from_its_carried_folder(tmp_path, monkeypatch, data_dir, shared_models):
    """`gpu` reads only bench-gpu/ (MELD's CSVs, LLaMA-2's tokenizer): a tiny-shape smoke test of its code path."""
    monkeypatch.setattr(bench, "GPU_ASSETS", tmp_path / "bench-gpu")
    tokenizer = shared_models / "llama2-tokenizer" / "tokenizer.model"
    bench.main(["gpu", "--prepare", "--tokenizer", str(tokenizer), "--out", str(tmp_path)])
    monkeypatch.setenv("DIALOGUELLM_DATA", str(tmp_path / "no-data"))  # nothing but the carried folder
    bench.main(["gpu", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench-gpu.json").read_text())
    rows = report["results"]
    assert len(rows) == 8 and all(r["fits_40GB"] for r in rows.values())
    for length in (256, 512):
        for ckpt in ("auto", "all"):
            ours, ref = rows[f"ours {length} {ckpt}"], rows[f"transformers_peft {length} {ckpt}"]
            # The same random weights give the same loss: float32 agrees to ~1e-6, while a wrong rotary table (as
            # to_empty() once left transformers') is off by 4e-5 to 5e-4.
            assert ours["first_loss"] == pytest.approx(ref["first_loss"], abs=1e-5)
        ours = rows[f"ours {length} all"]
        assert ours["blocks"] == 4 and ours["window"] > 0
