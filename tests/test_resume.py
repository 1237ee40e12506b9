"""train.py --resume: a run killed with SIGKILL after any checkpoint and resumed ends with exactly the adapter of an
uninterrupted run; unsafe checkpoints are refused; a non-finite loss stops the run and keeps the last checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import train
from helpers import make_checkpoint, make_meld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tmp_path, out):
    return ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--max-steps", "6", "--save-every", "1", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1",
            "--eval-every", "3", "--dev-limit", "4", "--window", "1", "--warmup", "2", "--lr", "1e-2", "--device", "cpu",
            "--dtype", "float32"]


def run(argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


# train.py with one change: after writing ckpt_last.pt of step HOLD_AT it creates MARKER and waits to be killed.
# So the kill always lands after that checkpoint and before the run could finish: no race with the clock.
HOLDING = """
import sys, time
import cli, train
hold_at, marker = int(sys.argv[1]), sys.argv[2]
write = cli.atomic_write
def holding(path, content):
    write(path, content)
    if path.name == "ckpt_last.pt" and content["step"] == hold_at:
        open(marker, "w").close()
        time.sleep(600)
cli.atomic_write = holding
cli.run(lambda: train.main(sys.argv[3:]))
"""


def saved_step(path):
    return torch.load(path, weights_only=True)["step"]


def wait_for(path, proc, seconds=300):
    """Poll for `path` while proc runs, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"{path} not written in {seconds} s"
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path, shared_models):
    make_checkpoint(tmp_path / "model", shared_models)
    make_meld(tmp_path / "data", n_dialogues=8)
    return tmp_path


@pytest.mark.parametrize("kill_after", [1, 4])
def test_killed_and_resumed_run_ends_bitwise_equal(setup, kill_after):
    tmp_path = setup
    ref = tmp_path / "ref"
    assert run(args(tmp_path, ref)).wait(timeout=300) == 0
    out, marker = tmp_path / "killed", tmp_path / "holding"
    proc = subprocess.Popen([sys.executable, "-c", HOLDING, str(kill_after), str(marker), *args(tmp_path, out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = saved_step(out / "ckpt_last.pt")
    assert killed_at == kill_after
    p = run(["--resume", str(out / "ckpt_last.pt")])
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    a, b = torch.load(ref / "ckpt_last.pt", weights_only=True), torch.load(out / "ckpt_last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["lora"].keys() == b["lora"].keys()
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), (k, killed_at)
    metrics = lambda d: [line for line in (d / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [r.split(', "tokens_per_s"')[0] for r in rows]  # throughput differs, the rest must not
    assert strip(metrics(out)) == strip(metrics(ref))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_refuses_pickled_objects(tmp_path):
    path = tmp_path / "ckpt_last.pt"
    torch.save({"config": {}, "lora": {}, "x": Evil()}, path)
    with pytest.raises(cli.UserError, match="ckpt_last.pt: refused: it holds Python objects"):
        train.main(["--resume", str(path)])


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(setup, monkeypatch):
    tmp_path, out = setup, setup / "run"
    writes = []
    save = train.cli.atomic_write

    def recording(path, content):
        save(path, content)
        if path.name == "ckpt_last.pt":
            writes.append(path.read_bytes())
    monkeypatch.setattr(train.cli, "atomic_write", recording)
    ce, calls = train.F.cross_entropy, []

    def poisoned(*a, **k):  # micro-batches 5 and 6 make step 3
        calls.append(1)
        loss = ce(*a, **k)
        return loss * float("nan") if len(calls) == 6 else loss
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    with pytest.raises(cli.UserError, match="at step 3; stopped, keeping the last good checkpoint"):
        train.main(args(tmp_path, out))
    state = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert state["step"] == 2 and (out / "ckpt_last.pt").read_bytes() == writes[-1]
    assert all(torch.isfinite(v).all() for v in state["lora"].values())
