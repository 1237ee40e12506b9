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
