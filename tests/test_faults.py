"""Faults, streams and the run folder (issue 23): each row of its table, done for real in a child process.

Two runs into one folder, a copied and a moved run resumed, a torn metrics line, exports onto a model or an
existing export, Ctrl-C and SIGTERM sent to training and labelling, a disk full (a small tmpfs), a read-only
file system (a tmpfs remounted read-only), permission denied (the child drops to `nobody`), a closed pipe, a
closed stdout or stdin, and odd values in --input. Each asserts the exit status, one last stderr line
`<script>: error: ...` (or the quiet end of `| head`), no traceback, and that no earlier file changed. A fault
that cannot be set up (not root, no tmpfs) fails under DIALOGUELLM_REQUIRE_DATA=1 instead of skipping.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import cli
from conftest import REQUIRE
from helpers import make_checkpoint, make_meld

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def script(name, *argv, env=None, prefix=(), **kw) -> subprocess.CompletedProcess:
    """Run `python <name> argv` to its end: (status, stdout, stderr) as text."""
    if "stdout" not in kw:
        kw["capture_output"] = True
    return subprocess.run([*prefix, sys.executable, str(ROOT / name), *map(str, argv)], cwd=ROOT, env=env or ENV,
                          text=True, timeout=300, **kw)


def default_sigint() -> None:
    """In the child before exec: Ctrl-C at its default, as at a terminal. A test run started in the background
    (`cmd &` in a script) inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(name, *argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / name), *map(str, argv)], cwd=ROOT, env=ENV, text=True,
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE,
                            preexec_fn=default_sigint, **kw)


def one_line(status, err, name, code, *expected) -> str:
    """Assert the exit status, no traceback and a last stderr line `<name>: error: ...` holding `expected`."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err and status == code, (status, err[-3000:])
    assert last.startswith(f"{name}: error: ") and all(e in last for e in expected), last
    return last


def snapshot(folder: Path) -> dict:
    """Every file under folder (the lock file aside) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def cannot(reason: str):
    """A fault this machine cannot set up: a failure under DIALOGUELLM_REQUIRE_DATA=1, else a skip."""
    if REQUIRE:
        pytest.fail(reason + " — DIALOGUELLM_REQUIRE_DATA=1 forbids skipping")
    pytest.skip(reason)


def train_args(base, out, steps=4, **more):
    flags = dict(model=base / "model", data_dir=base / "data", out=out, max_steps=steps, save_every=2,
                 batch_size=2, grad_accum=2, dev_limit=4, window=1, warmup=1, r=2, targets="wq,wv", device="cpu")
    flags.update(more)
    return [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_models) -> Path:
    """A tiny model, a tiny MELD and a finished 4-step run (run/) trained on them."""
    base = tmp_path_factory.mktemp("faults")
    make_checkpoint(base / "model", shared_models)
    make_meld(base / "data", n_dialogues=8)
    p = script("train.py", *train_args(base, base / "run"))
    assert p.returncode == 0, p.stderr[-3000:]
    return base


@pytest.fixture
def partial(base, tmp_path) -> Path:
    """A copy of run/ whose ckpt_last.pt was saved at step 4 of 6: --resume has two steps to do."""
    run = tmp_path / "runT"
    shutil.copytree(base / "run", run)
    state = torch.load(run / "ckpt_last.pt", weights_only=True)
    state["config"]["max_steps"] = 6
    torch.save(state, run / "ckpt_last.pt")
    return run


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, what, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def rows_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---------------------------------------------------------------- one run, one folder


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(base, tmp_path):
    out = tmp_path / "runC"
    first = start("train.py", *train_args(base, out, steps=100000, save_every=1000))
    try:
        wait_for(lambda: rows_of(out / "metrics.jsonl") >= 1, first, "a first step")
        p = script("train.py", *train_args(base, out, seed=1), "--overwrite")
        one_line(p.returncode, p.stderr, "train.py", 1, f"--out {out}: in use by another run (pid {first.pid})")
    finally:
        first.kill()
        first.wait()
    names = [name for name in ("ckpt.pt", "ckpt_last.pt") if (out / name).exists()]
    written = [torch.load(out / name, weights_only=True) for name in names]
    assert all(state["config"]["seed"] == 0 for state in written)  # the refused run (seed 1) wrote nothing


def test_a_second_evaluation_into_a_locked_results_folder_is_refused(base, tmp_path):
    """Two evaluations writing one results folder at once would leave one's metrics.json beside the other's
    predictions.jsonl: the second is refused, naming the holder, and writes nothing."""
    folder = tmp_path / "res" / "eval-test-limit4"
    folder.mkdir(parents=True)
    hold = f"import cli, sys, time; cli.lock_folder({str(folder)!r}); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = script("eval.py", base / "run/ckpt.pt", "--limit", "4", "--out", tmp_path / "res")
        one_line(p.returncode, p.stderr, "eval.py", 1, f"--out {folder}: in use by another run (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no metrics.json, no predictions.jsonl


def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original(partial, tmp_path):
    copy = tmp_path / "runT2"
    shutil.copytree(partial, copy)
    before = snapshot(partial)
    p = script("train.py", "--resume", copy / "ckpt_last.pt")
    assert p.returncode == 0, p.stderr[-3000:]
    assert snapshot(partial) == before
    assert steps_logged(copy) == [1, 2, 3, 4, 5, 6]
    assert torch.load(copy / "ckpt_last.pt", weights_only=True)["config"]["out"] == str(copy)


def test_a_moved_run_resumes_where_it_is(partial, tmp_path):
    moved = tmp_path / "runI_moved"
    partial.rename(moved)
    p = script("train.py", "--resume", moved / "ckpt_last.pt")
    assert p.returncode == 0, p.stderr[-3000:]
    assert steps_logged(moved) == [1, 2, 3, 4, 5, 6] and not partial.exists()


@pytest.mark.parametrize("tail", ['{"step": 5, "lo', "\n", '{"step": 5, "loss"\n'], ids=["torn", "blank", "broken"])
def test_a_torn_or_blank_last_metrics_line_is_dropped_and_counted(partial, tail):
    with open(partial / "metrics.jsonl", "a") as f:
        f.write(tail)
    p = script("train.py", "--resume", partial / "ckpt_last.pt")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "metrics.jsonl: dropped 1 torn or blank line(s)" in p.stderr
    assert steps_logged(partial) == [1, 2, 3, 4, 5, 6]


def test_a_stale_lock_and_leftover_temp_files_are_taken_over_and_said(partial):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (partial / ".lock").write_text(f"{dead.pid}\n")
    (partial / ".ckpt_last.pt.k9x_2abc").write_bytes(b"half a checkpoint")
    p = script("train.py", "--resume", partial / "ckpt_last.pt")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"took over the stale lock of pid {dead.pid}" in p.stderr
    assert "removed 1 temp file(s) left by an interrupted save" in p.stderr
    assert not (partial / ".ckpt_last.pt.k9x_2abc").exists()
    assert (partial / ".lock").read_text() == ""  # released at the end: the next run finds no stale pid


# ---------------------------------------------------------------- exports never destroy


def test_an_export_onto_its_base_model_is_refused_even_with_overwrite(base):
    before = snapshot(base / "model")
    for flag in ("--export-merged", "--export-peft"):
        p = script("train.py", flag, base / "model", "--from", base / "run/ckpt.pt", "--overwrite")
        one_line(p.returncode, p.stderr, "train.py", 2, f"{flag} {base / 'model'}: the folder of the base model")
    assert snapshot(base / "model") == before


def test_a_second_export_into_a_folder_is_refused_unless_overwrite(base, tmp_path):
    exp = tmp_path / "exp1"
    args = ("--export-peft", exp, "--from", base / "run/ckpt.pt")
    assert script("train.py", *args).returncode == 0
    before = snapshot(exp)
    p = script("train.py", *args)
    one_line(p.returncode, p.stderr, "train.py", 2, f"--export-peft {exp}: not empty (adapter_config.json",
             "--overwrite")
    assert snapshot(exp) == before
    assert script("train.py", *args, "--overwrite").returncode == 0


# ---------------------------------------------------------------- signals


def wait_for_step(out: Path, proc):
    wait_for(lambda: rows_of(out / "metrics.jsonl") >= 2, proc, "two steps")


@pytest.mark.parametrize("signum,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_in_training_saves_the_step_and_says_how_to_resume(base, tmp_path, signum, code, name):
    out = tmp_path / "run"
    proc = start("train.py", *train_args(base, out, steps=100000, save_every=1000))
    wait_for_step(out, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    last = one_line(proc.returncode, err, "train.py", code, f"interrupted ({name}) after step",
                    f"continue with: python train.py --resume {out / 'ckpt_last.pt'}")
    step = int(last.split("after step ")[1].split(":")[0])
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] == step == steps_logged(out)[-1]
    assert [p.name for p in out.iterdir() if p.name.startswith(".ckpt")] == []


def test_a_second_signal_stops_at_once_leaving_the_last_good_checkpoint(base, tmp_path):
    out = tmp_path / "run"
    proc = start("train.py", *train_args(base, out, steps=100000, save_every=2))
    wait_for(lambda: (out / "ckpt_last.pt").exists(), proc, "a checkpoint")
    proc.send_signal(signal.SIGINT)  # two signals of one kind sent at once arrive as one: the second is SIGTERM
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    one_line(proc.returncode, err, "train.py", 143, "interrupted again (SIGTERM): stopped at once",
             f"the last good checkpoint {out / 'ckpt_last.pt'} is kept")
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["step"] >= 2
    assert [p.name for p in out.iterdir() if p.name.startswith(".ckpt")] == []


def test_a_second_ctrl_c_raises_at_once(monkeypatch):
    import cli
    monkeypatch.setattr(cli, "_in_script", True)
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = cli.StopRequest(lambda: "left as it was")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
        assert stop and stop.signum == signal.SIGINT
        with pytest.raises(cli.Interrupted, match=r"interrupted again \(Ctrl-C\): stopped at once; left as it was"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        with pytest.raises(cli.Interrupted, match=r"interrupted \(Ctrl-C\) after step 3") as e:
            stop.exit_if_asked("after step 3")
        assert e.value.exit_code == 130
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def write_talks(path: Path, n: int, utterances: int = 2) -> Path:
    line = lambda i: json.dumps({"id": f"t{i}", "utterances": [  # noqa: E731
        {"speaker": "Ann" if j % 2 else "Bob", "text": f"we were on a break {i} {j}"} for j in range(utterances)]})
    path.write_text("".join(line(i) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("signum,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_in_labelling_keeps_the_finished_labels_and_says_how_far(base, tmp_path, signum, code, name):
    talks = write_talks(tmp_path / "talks.jsonl", 20000)
    labels = tmp_path / "labels.jsonl"
    with open(labels, "w") as f:
        proc = start("eval.py", base / "run/ckpt.pt", "--input", talks, stdout=f)
        wait_for(lambda: rows_of(labels) >= 1, proc, "a first chunk")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    last = one_line(proc.returncode, err, "eval.py", code, f"interrupted ({name}) after", "of 20000 conversations")
    done = int(last.split(" after ")[1].split(" of ")[0])
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert 0 < done < 20000 and len(rows) == 2 * done
    assert [(r["id"], r["index"]) for r in rows] == [(f"t{i}", j) for i in range(done) for j in range(2)]


# ---------------------------------------------------------------- streams


def test_a_closed_pipe_ends_quietly(base, tmp_path):
    talks = write_talks(tmp_path / "talks.jsonl", 600)
    cmd = f"{sys.executable} eval.py {base / 'run/ckpt.pt'} --input {talks} 2>{tmp_path / 'err'} | head -1"
    p = subprocess.run(["bash", "-c", cmd + "; echo ${PIPESTATUS[0]} >&2"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    err = (tmp_path / "err").read_text()
    assert json.loads(p.stdout)["id"] == "t0" and "Traceback" not in err and "error" not in err, err[-2000:]
    assert p.stderr.strip() in ("0", str(128 + signal.SIGPIPE))


@pytest.mark.parametrize("redirect,expected", [(">&-", "stdout is closed"), ("<&-", "stdin is closed")])
def test_a_closed_stdout_or_stdin_is_one_line_before_the_model_loads(base, tmp_path, redirect, expected):
    talks = write_talks(tmp_path / "talks.jsonl", 2)
    source = "- --format jsonl" if redirect == "<&-" else talks
    cmd = f"{sys.executable} eval.py {base / 'run/ckpt.pt'} --input {source} {redirect}"
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    one_line(p.returncode, p.stderr, "eval.py", 1, expected)
    assert len(p.stderr.strip().splitlines()) == 1  # said before "label set", before the model loads


# ---------------------------------------------------------------- OS errors


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs at tmp_path/fs, unmounted after the test."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)]).returncode:
        cannot("mounting a tmpfs needs root")
    yield fs
    subprocess.run(["umount", "-l", str(fs)])


def fill(fs: Path) -> None:
    """Leave no free byte on the file system of fs."""
    with open(fs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_in_training_export_eval_and_labelling_is_one_line(base, tmpfs, tmp_path):
    run = tmpfs / "run"
    shutil.copytree(base / "run", run, ignore=shutil.ignore_patterns("eval-*"))
    state = torch.load(run / "ckpt_last.pt", weights_only=True)
    state["config"]["max_steps"] = 6
    torch.save(state, run / "ckpt_last.pt")
    fill(tmpfs)
    before = snapshot(run)
    p = script("train.py", "--resume", run / "ckpt_last.pt")
    one_line(p.returncode, p.stderr, "train.py", 1, f"{run}/metrics.jsonl: writing failed: No space left on device "
             "(ENOSPC); the previous file is kept")
    p = script("train.py", "--export-peft", tmpfs / "exp", "--from", run / "ckpt.pt")
    one_line(p.returncode, p.stderr, "train.py", 1, f"{tmpfs / 'exp'}", "(ENOSPC)")
    p = script("eval.py", run / "ckpt.pt", "--data-dir", base / "data", "--limit", "4")
    one_line(p.returncode, p.stderr, "eval.py", 1, f"{run}/eval-test", "(ENOSPC)")
    talks = write_talks(tmp_path / "talks.jsonl", 3)
    with open(tmpfs / "labels.jsonl", "w") as out:
        p = script("eval.py", run / "ckpt.pt", "--input", talks, stdout=out, stderr=subprocess.PIPE)
    one_line(p.returncode, p.stderr, "eval.py", 1, "stdout: writing failed", "(ENOSPC)")
    assert snapshot(run) == before


def test_a_read_only_file_system_and_a_read_only_home_are_one_line(base, tmpfs):
    (tmpfs / "home").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode:
        cannot("remounting a tmpfs read-only failed")
    p = script("train.py", "--export-peft", tmpfs / "exp", "--from", base / "run/ckpt.pt")
    one_line(p.returncode, p.stderr, "train.py", 2, f"--export-peft {tmpfs / 'exp'}", "not a writable folder")
    env = {k: v for k, v in ENV.items() if k != "DIALOGUELLM_CACHE"}
    p = script("eval.py", "--zero-shot", "--limit", "1", "--data-dir", base / "data", "--out", base / "zs",
               env=dict(env, HOME=str(tmpfs / "home")))
    one_line(p.returncode, p.stderr, "eval.py", 1, f"{tmpfs / 'home'}/.cache", "Read-only file system (EROFS)")


def test_a_full_model_cache_at_the_first_conversion_is_one_line(base, tmpfs):
    """safetensors and tokenizers raise their own errors on a full disk: still one line, and no half model left."""
    p = script("eval.py", "--zero-shot", "--limit", "1", "--data-dir", base / "data", "--out", base / "zs-full",
               env=dict(ENV, DIALOGUELLM_CACHE=str(tmpfs / "cache")))
    one_line(p.returncode, p.stderr, "eval.py", 1, f"{tmpfs / 'cache'}: converting the default model failed",
             "No space left on device", "DIALOGUELLM_CACHE")
    assert list((tmpfs / "cache").iterdir()) == []


# Root passes every permission check; the child drops the two capabilities that let it (setpriv), which is
# what dropping to `nobody` does for files, while it can still run the Python under /root (mode 700).
NO_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def test_permission_denied_is_one_line(base, tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        cannot("permission denied needs root and setpriv to drop root's override")
    secret = tmp_path / "ckpt.pt"
    shutil.copy(base / "run/ckpt.pt", secret)
    os.chmod(secret, 0)
    p = script("train.py", "--export-peft", tmp_path / "exp", "--from", secret, prefix=NO_OVERRIDE)
    one_line(p.returncode, p.stderr, "train.py", 1, f"{secret}: Permission denied (EACCES)")
    sealed = tmp_path / "sealed"
    sealed.mkdir(mode=0o555)
    p = script("eval.py", base / "run/ckpt.pt", "--data-dir", base / "data", "--out", sealed, prefix=NO_OVERRIDE)
    one_line(p.returncode, p.stderr, "eval.py", 2, f"--out {sealed}/eval-test: {sealed} is not a writable folder")


def test_a_dangling_symlink_out_is_one_line(base, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    p = script("train.py", *train_args(base, tmp_path / "link"))
    one_line(p.returncode, p.stderr, "train.py", 2, f"--out {tmp_path / 'link'}: a symlink to", "does not exist")


# ---------------------------------------------------------------- values checked before the model loads

BAD_VALUES = [
    ('{"id": NaN, "utterances": [{"speaker": "A", "text": "hi"}]}', "key 'id' is nan"),
    ('{"id": 1e400, "utterances": [{"speaker": "A", "text": "hi"}]}', "key 'id' is inf"),
    ('{"id": [[1]], "utterances": [{"speaker": "A", "text": "hi"}]}', "key 'id' is [[1]]"),
    ('{"id": "' + "x" * 201 + '", "utterances": [{"speaker": "A", "text": "hi"}]}', "at most 200 characters"),
    ('{"id": ' + "9" * 5000 + ', "utterances": []}', "Exceeds the limit (4300 digits)"),
    ('{"id": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ('{"utterances": [{"speaker": "A", "text": "\\ud800"}]}', "key 'text' holds a lone surrogate"),
    ('{"utterances": [{"speaker": "' + "A" * 5000 + '", "text": "hi"}]}',
     "talks.jsonl:1: utterances[0] key 'speaker' (5000 characters) leaves no room"),
    ('{"utterances": [{"speaker": "A", "text": "hi", "description": "' + "w " * 13000 + '"}]}',
     "talks.jsonl:1: utterances[0] key 'description' (26000 characters) leaves no room"),
]


@pytest.mark.parametrize("line,expected", BAD_VALUES, ids=[b[1][:24] for b in BAD_VALUES])
def test_odd_values_in_input_are_one_line_before_the_model_loads(base, tmp_path, line, expected):
    talks = tmp_path / "talks.jsonl"
    talks.write_text(line + "\n")
    p = script("eval.py", base / "run/ckpt.pt", "--input", talks)
    one_line(p.returncode, p.stderr, "eval.py", 1, expected)
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1


def test_unicode_digits_in_a_csv_id_and_folders_for_files_are_one_line(base, tmp_path):
    csv = tmp_path / "talks.csv"
    csv.write_text("Dialogue_ID,Utterance_ID,Speaker,Utterance\n0,²,A,hi\n")
    p = script("eval.py", base / "run/ckpt.pt", "--input", csv)
    one_line(p.returncode, p.stderr, "eval.py", 1, "talks.csv:2: column Utterance_ID is '²'; expected an integer")
    p = script("eval.py", base / "run/ckpt.pt", "--input", tmp_path, "--format", "jsonl")
    one_line(p.returncode, p.stderr, "eval.py", 1, f"{tmp_path}: a folder; expected a file")
    p = script("train.py", *train_args(base, tmp_path / "r", data_dir=ROOT / "README.md"))
    one_line(p.returncode, p.stderr, "train.py", 2, "README.md: not a folder")
    meld = make_meld(tmp_path / "data")
    train_csv = meld / "meld/train_sent_emo.csv"
    header, first, *rest = train_csv.read_text().splitlines(keepends=True)
    fields = first.split(",")
    fields[6] = "²"  # Utterance_ID: "²".isdigit() is True, int("²") fails
    train_csv.write_text("".join([header, ",".join(fields), *rest]))
    p = script("train.py", *train_args(base, tmp_path / "r2", data_dir=meld))
    one_line(p.returncode, p.stderr, "train.py", 1, "train_sent_emo.csv:", "column Utterance_ID is '²'")


# ---------------------------------------------------------------- the default model's cache


def test_a_truncated_model_cache_is_converted_again_and_said(tmp_path, monkeypatch, capsys):
    import convert

    def fake_convert(gguf_path, folder):  # the real conversion takes a minute; its files are what matters here
        for name in convert.HF_FILES:
            (Path(folder) / name).write_text(f"{name} converted")
    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    monkeypatch.setenv("DIALOGUELLM_CACHE", str(tmp_path))
    out = convert.model_dir("default")
    record = json.loads((out / convert.MANIFEST).read_text())
    assert record["model.safetensors"]["size"] == len("model.safetensors converted")
    assert len(record["model.safetensors"]["sha256"]) == 64
    (out / "model.safetensors").write_text("model.safe")  # truncated
    capsys.readouterr()
    assert convert.model_dir("default") == out
    err = capsys.readouterr().err
    assert "model.safetensors is 10 bytes, its conversion wrote 27: converting it again" in err
    assert (out / "model.safetensors").read_text() == "model.safetensors converted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # nothing left aside


# ---------------------------------------------------------------- the second attack (74 tries): what it found

def test_an_evaluation_piped_to_head_keeps_its_results(base, tmp_path):
    """`eval.py CKPT | head -1`: the results are written before anything is printed, so a closed pipe loses
    nothing (the evaluation's results were thrown away after the whole run)."""
    out = tmp_path / "res"
    cmd = f"{sys.executable} eval.py {base / 'run/ckpt.pt'} --limit 4 --out {out} 2>{tmp_path / 'err'} | head -1"
    p = subprocess.run(["bash", "-c", cmd + "; echo ${PIPESTATUS[0]} >&2"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.stderr.strip() in ("0", str(128 + signal.SIGPIPE)), (tmp_path / "err").read_text()[-2000:]
    assert json.loads((out / "eval-test-limit4" / "metrics.json").read_text())["meld"]["n"] == 4
    assert len((out / "eval-test-limit4" / "predictions.jsonl").read_text().splitlines()) == 4


def test_a_resume_from_another_folder_reads_the_same_data(base, tmp_path):
    """--data-dir and --descriptions are stored absolute: a relative --data-dir resumed from another working
    folder (with a data/ of its own) would have trained on other data."""
    import train
    cfg, _ = train.parse_config([str(x) for x in train_args(base, tmp_path / "r", data_dir="data")])
    assert cfg.data_dir == str(Path("data").resolve())
    with pytest.raises(cli.UsageError, match="--out is empty"):
        train.parse_config([str(x) for x in train_args(base, "", data_dir=base / "data")])


def test_jsonl_texts_may_hold_line_separators_and_input_may_be_a_fifo(tmp_path):
    """Valid JSON lines whose texts hold U+2028 or U+0085 (json.dumps(ensure_ascii=False) writes them raw) are
    read whole, and --input may be a FIFO or a process substitution, not only a regular file."""
    import label
    record = {"id": "c", "utterances": [{"speaker": "A", "text": "one\u2028two\x85three"}]}
    path = tmp_path / "talks.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert label.read_conversations(path, "jsonl")[0]["utterances"][0]["text"] == "one\u2028two\x85three"
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(path.read_text(encoding="utf-8"), encoding="utf-8"))
    writer.start()
    assert label.read_conversations(fifo, "jsonl")[0]["id"] == "c"
    writer.join(timeout=10)


def test_results_are_written_with_the_umask_s_mode(tmp_path):
    """atomic_write's files get what the umask gives an ordinary file, not mkstemp's 0600 (colleagues on a
    shared machine could not read a run's checkpoints or exports)."""
    cli.atomic_write(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~cli.UMASK


def test_broken_model_files_are_one_line(tmp_path, shared_models):
    """A truncated model.safetensors, an index.json whose weight_map is not an object, a truncated
    tokenizer.model: one line naming the file, not a traceback."""
    import llama
    make_checkpoint(tmp_path / "m", shared_models)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(cli.UserError, match="model.safetensors: not a readable safetensors file"):
        llama.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(cli.UserError, match="no weight_map object"):
        llama.load(tmp_path / "m")
    tok = tmp_path / "m" / "tokenizer.model"
    tok.write_bytes(tok.read_bytes()[:50])
    with pytest.raises(cli.UserError, match="tokenizer.model: not a sentencepiece model"):
        llama.load_tokenizer(tmp_path / "m")
