"""torchrun --nproc_per_node 2 train.py (gloo on CPU): the same losses and adapter as one process with the same
global batch; only rank 0 writes."""
import json
import os
import subprocess
import sys

import torch

from helpers import make_checkpoint, make_meld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_match_one(tmp_path, shared_models):
    make_checkpoint(tmp_path / "model", shared_models)
    make_meld(tmp_path / "data", n_dialogues=8)
    argv = ["train.py", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--max-steps", "3",
            "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1", "--window", "1",
            "--lr", "1e-2", "--warmup", "1", "--device", "cpu", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: torchrun's own rendezvous store binds port 0 and hands the port it got to the workers, so no
    # port is found free here and taken by another process before it is bound.
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *argv, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows("two")] == [1, 2, 3]  # rank 0 alone logs
    for a, b in zip(rows("one"), rows("two")):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["lr"] == b["lr"]
    # The dev evaluation, split over the ranks and gathered: every one of the 32 dev utterances, the same predictions
    dev = {d: torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["dev"] for d in ("one", "two")}
    assert dev["one"]["n"] == dev["two"]["n"] == 32  # a rank's share lost would show here
    assert dev["one"]["confusion"] == dev["two"]["confusion"]
    assert rows("one")[-1]["dev_weighted_f1"] == rows("two")[-1]["dev_weighted_f1"]
    assert rows("one")[-1]["dev_uncalibrated_weighted_f1"] == rows("two")[-1]["dev_uncalibrated_weighted_f1"]
    a, b = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True)["lora"] for d in ("one", "two"))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
