"""What every script shares at its edge: the user's errors, flag checks, safe file writes and checkpoint reads,
the run folder's lock, signals and streams.

A script raises UserError (UsageError for a bad flag) for anything the user can fix: a bad flag, file, data row,
checkpoint or endpoint. `run(main)` turns it into one line `<script>: error: <message>` and a non-zero exit; so
it does with an OSError (disk full, read-only, permission denied), naming the path, and with Ctrl-C or SIGTERM
(exit 130 / 143). A closed pipe (`| head`) ends quietly, as Unix tools do. Any other exception is a bug and keeps
its traceback. DIALOGUELLM_DEBUG=1 shows the traceback of user errors too.
"""
import argparse
import atexit
import csv
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

class UserError(ValueError):
    """A problem the user can fix, said in one line that names the file, line, key or flag. Exit status 1."""
    exit_code = 1

class UsageError(UserError):
    """A bad command-line flag or flag combination. Exit status 2, as argparse's own errors."""
    exit_code = 2

class MissingError(UserError, FileNotFoundError):
    """A file or folder that is not there."""

class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: exit status 128 + its number (Ctrl-C: 130, SIGTERM: 143), as shells report.
    A KeyboardInterrupt, not an Exception, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum

def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

def _interrupt(signum, frame):
    raise Interrupted(f"interrupted ({signal_name(signum)})", signum)

_in_script = False  # True inside run(): only a script changes signal handlers, never an in-process caller

def run(main) -> None:
    """Call main() and exit: 0 on success; for a UserError, an OSError or a signal one line on stderr and a
    non-zero status; a closed stdout (`| head`) ends quietly with SIGPIPE's status."""
    global _in_script
    prog = Path(sys.argv[0]).name
    script = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if script else None
    _in_script = script
    try:
        status = main()
        if sys.stdout is not None:
            sys.stdout.flush()  # here, so that a closed pipe is met inside the try
    except BrokenPipeError:  # the reader of stdout went away (`| head -1`): stop without a word, as Unix tools do
        silence_stdout()
        sys.exit(128 + signal.SIGPIPE)
    except (UserError, KeyboardInterrupt, OSError) as e:
        if os.environ.get("DIALOGUELLM_DEBUG") == "1":
            raise
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
            e = Interrupted("interrupted (Ctrl-C)")
        message = str(e) if isinstance(e, (UserError, Interrupted)) else os_error_text(e)
        close_progress_bars()
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    finally:
        _in_script = False
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(status if isinstance(status, int) else 0)

def close_progress_bars() -> None:
    """Close the tqdm bars an error left open now, so that they do not print after the error's line at exit."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()

def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so the interpreter's last flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

def os_error_text(e: OSError, what: str = "") -> str:
    """One line for an OSError: the path, what failed, the system's reason and its code (ENOSPC, EROFS...)."""
    code = errno.errorcode.get(e.errno, "")
    path = f"{e.filename}: " if e.filename is not None else ""
    reason = e.strerror or str(e)
    return f"{path}{what + ' failed: ' if what else ''}{reason}{f' ({code})' if code else ''}"

def check_streams(stdin: bool = False) -> None:
    """UserError unless stdout (and, when read, stdin) is open: said before any model loads, not after."""
    for name, stream, needed in (("stdout", sys.stdout, True), ("stdin", sys.stdin, stdin)):
        if needed and (stream is None or stream.closed or not _fd_open(stream)):
            use = "the labels go there: give it a file or a pipe" if name == "stdout" else "--input - reads it"
            raise UserError(f"{name} is closed; {use}")

def _fd_open(stream) -> bool:
    """Whether a stream's file descriptor is open (a stream in memory, as under pytest, has none: open)."""
    try:
        fd = stream.fileno()
    except (AttributeError, io.UnsupportedOperation):
        return True
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

# ---------------------------------------------------------------- flag types for argparse

def _number(kind, text: str, valid, expected: str):
    """`text` read by kind (int or float), finite and valid(value); else an argparse error saying `expected`."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value

def positive_int(text: str) -> int:
    return _number(int, text, lambda n: n > 0, "an integer > 0")

def natural_int(text: str) -> int:
    return _number(int, text, lambda n: n >= 0, "an integer >= 0")

def positive_float(text: str) -> float:
    return _number(float, text, lambda x: x > 0, "a number > 0")

def fraction(text: str) -> float:
    """A probability in [0, 1), such as a dropout rate."""
    return _number(float, text, lambda x: 0 <= x < 1, "a number in [0, 1)")

def blocks(value: str) -> str:
    """--grad-ckpt: auto, all, none, or a number of blocks (the first ones are checkpointed)."""
    if value in ("auto", "all", "none") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"expected auto, all, none or a number of blocks, got {value!r}")

def boolean(text: str) -> bool:
    """Strict: true/false, yes/no, 1/0 (any case); anything else is an error, never a silent False."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]

def check_names(flag: str, given: list[str], valid) -> None:
    """UsageError naming the flag and listing the valid names unless every name in `given` is valid."""
    bad = [name for name in given if name not in valid]
    if bad:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, bad))}; expected one of {', '.join(valid)}")

def check_device(device: str) -> None:
    """UsageError unless torch can run on `device` ('cpu', 'cuda', 'cuda:1', 'mps')."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: expected cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here")

# x86 flags (/proc/cpuinfo) of CPUs that multiply bfloat16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16
# matmuls are emulated and no faster than float32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")

def cpu_flags() -> set[str]:
    """The CPU's feature flags, from the first `flags` line of /proc/cpuinfo; empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()

def auto_dtype(device: str) -> tuple[str, str]:
    """What --dtype auto means on `device`: (float32 or bfloat16, why). bfloat16 on a CUDA GPU that supports it
    and on a CPU with BF16_FLAGS; float32 elsewhere."""
    kind = device.split(":")[0]  # not torch.device: a bad --device is refused later, by check_device
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bfloat16"
        return "float32", "the GPU does not support bfloat16"
    if kind != "cpu":
        return "float32", f"bfloat16 is not tried on {kind}"
    found = sorted(set(BF16_FLAGS) & cpu_flags())
    if found:
        return "bfloat16", f"the CPU multiplies bfloat16 natively ({', '.join(found)})"
    return "float32", f"the CPU has none of {', '.join(BF16_FLAGS)}, so bfloat16 would be emulated"

def check_writable(folder, flag: str = "--out") -> None:
    """UsageError unless `folder` exists as a writable folder or can be created (checked before any work)."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"{flag} {folder}: a symlink to {os.readlink(folder)}, which does not exist")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {parent} is not a writable folder")

def claim_folder(folder, flag: str = "--out", leftovers=()) -> None:
    """Create an output folder (UsageError unless it can be written: check_writable) and lock it for this process
    (lock_folder, which removes `leftovers`' interrupted saves): a run, an export and an evaluation each write
    into a folder no other process is writing into."""
    check_writable(folder, flag)
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock_folder(folder, flag, leftovers)

def claim_run_folder(out, run_files, overwrite: bool, resume: bool = False) -> None:
    """Create --out and lock it for this run (claim_folder); for a new run, UsageError if it holds one of
    run_files, unless overwrite (which deletes them)."""
    out = Path(out)
    claim_folder(out, "--out", run_files)
    found = [name for name in run_files if (out / name).exists()]
    if found and not overwrite and not resume:
        hint = f"continue it with --resume {out / 'ckpt_last.pt'}, or " if "ckpt_last.pt" in found else ""
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); {hint}replace it with --overwrite")
    for name in found if not resume else ():
        (out / name).unlink()

# ---------------------------------------------------------------- one run, one folder: the lock

LOCK = ".lock"  # in the run (or export) folder; holds the pid of the process that has it
_locks: dict[Path, int] = {}  # folder -> open lock file: flock holds while the file stays open

def lock_folder(folder, flag: str = "--out", leftovers=()) -> None:
    """Hold an exclusive lock on `folder` until this process ends (or release_locks): UserError naming the
    holder's pid if another process has it. A lock file still naming a pid is a run that ended without
    releasing it (killed): taken over, and said so. Then temp files of interrupted saves of `leftovers` go."""
    folder = Path(folder)
    if folder.resolve() in _locks:
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{flag} {folder}: in use by another run (pid {holder}); wait for it to end, or choose "
                        f"another {flag}") from None
    stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if stale:
        print(f"{folder}: took over the stale lock of pid {stale} (it ended without releasing it)", file=sys.stderr)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only its pid is not told
        pass
    _locks[folder.resolve()] = fd
    remove_leftovers(folder, leftovers)

def release_locks() -> None:
    """Empty and close every lock file this process holds: the next run finds no stale pid."""
    for folder, fd in list(_locks.items()):
        os.ftruncate(fd, 0)
        os.close(fd)
        del _locks[folder]

atexit.register(release_locks)

def releasing_locks(main):
    """Decorate a main(): the folders it locked are released when it returns or raises (in-process callers)."""
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            release_locks()
    wrapper.__doc__ = main.__doc__
    return wrapper

def remove_leftovers(folder: Path, names) -> None:
    """Remove the temp files atomic_write leaves when killed while saving one of `names` (.ckpt_last.pt.XXXXXXXX);
    call only with the folder's lock held, so no live save loses its file."""
    patterns = [re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}") for name in names]
    found = [p for p in folder.iterdir() if any(pattern.fullmatch(p.name) for pattern in patterns)]
    for path in found:
        path.unlink()
    if found:
        print(f"{folder}: removed {len(found)} temp file(s) left by an interrupted save", file=sys.stderr)

def keep_log_rows(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl keeping its rows up to `step`; a torn or blank line (a run killed while writing it)
    is dropped and counted."""
    kept = []
    torn = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            torn += 1
        elif row["step"] <= step:
            kept.append(line + "\n")
    if torn:
        print(f"{path}: dropped {torn} torn or blank line(s)", file=sys.stderr)
    atomic_write(path, "".join(kept))

# How each of train.py's Config flags is read; a field not listed is a string.
TRAIN_FLAG_TYPES = dict(window=natural_int, max_len=positive_int, r=positive_int, lora_alpha=positive_float,
                        dropout=fraction, lr=positive_float, warmup=natural_int, epochs=positive_float,
                        batch_size=positive_int, grad_accum=positive_int, weight_decay=fraction, grad_ckpt=blocks,
                        grad_clip=positive_float, max_steps=natural_int, gpu_mem=positive_float, eval_every=natural_int,
                        dev_limit=positive_int, calibrate=boolean, save_every=positive_int, seed=natural_int)

def train_parser(description: str, config_type) -> argparse.ArgumentParser:
    """train.py's flags: one per field of config_type (train.Config), then the run's other flags."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_type):
        p.add_argument("--" + f.name.replace("_", "-"), type=TRAIN_FLAG_TYPES.get(f.name, str), default=f.default)
    p.add_argument("--resume", metavar="CKPT", help="ckpt_last.pt to continue, with its saved config")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (memory_plan) and exit")
    p.add_argument("--export-peft", metavar="DIR", help="write the adapter of --from as a Hugging Face peft adapter")
    p.add_argument("--export-merged", metavar="DIR", help="write --from merged into a full Hugging Face checkpoint")
    p.add_argument("--from", dest="src", metavar="CKPT", help="the checkpoint to export")
    p.add_argument("--shard-size", type=positive_float, metavar="GB",
                   help="--export-merged: the most gigabytes per safetensors shard (default 5, as the Hub)")
    return p

def saved_config(state: dict, a: argparse.Namespace, config_type) -> dict:
    """train.py --resume: the config a checkpoint was trained with, its out the checkpoint's folder (a
    copy resumes in itself). UsageError if other run flags were given (a resumed run is the saved run),
    UserError naming fields config_type (train.Config) does not know."""
    fields = dataclasses.fields(config_type)
    given = [f"--{f.name.replace('_', '-')}" for f in fields if getattr(a, f.name) != f.default]
    if given or a.overwrite:
        raise UsageError(f"--resume continues the saved run with its saved config; drop {given or '--overwrite'}")
    unknown = sorted(set(state["config"]) - {f.name for f in fields})
    if unknown:
        raise UserError(f"{a.resume}: its config has fields {unknown} that this train.py does not know")
    return dict(state["config"], out=str(Path(a.resume).parent))

def check_finite(last: Path, step: int, loss: torch.Tensor | None = None, params=()) -> None:
    """UserError that stops a training run at `step` (from 0) if its loss or an adapter parameter is
    not finite, naming its last good checkpoint `last` if it was written."""
    problem = None
    if loss is not None and not torch.isfinite(loss):
        problem = f"loss is {loss.item()}"
    elif not all(p.isfinite().all() for p in params):  # e.g. an infinite gradient under a finite loss
        problem = "the adapter is not finite"
    if problem:
        kept = f"keeping the last good checkpoint {last}" if last.exists() else "no checkpoint was written yet"
        raise UserError(f"{problem} at step {step + 1}; stopped, {kept}")

def setup_distributed(cfg) -> tuple[int, int]:
    """train.py's (world size, rank) from torchrun's environment; joins the process group if
    several, and puts this process on its GPU (cfg.device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if cfg.grad_accum % world:
        raise UsageError(f"--grad-accum {cfg.grad_accum} must be a multiple of the {world} processes, so the "
                         "global batch is the same as in one process")
    if world > 1:
        cuda = cfg.device.startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    return world, rank

# ---------------------------------------------------------------- signals: stop after this step

class StopRequest:
    """Ctrl-C or SIGTERM during a loop: the first asks it to stop after its current step (the loop tests
    `if stop:` and calls stop.exit_if_asked), a second Ctrl-C stops at once. `left` says what a stop at once
    leaves. Handlers are set only inside cli.run: an in-process caller keeps its own."""

    def __init__(self, left):
        self.signum = None
        self.left = left
        if _in_script:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(f"interrupted again ({signal_name(signum)}): stopped at once; {self.left()}", signum)
        self.signum = signum
        print(f"\n{signal_name(signum)}: finishing this step, then saving; Ctrl-C again stops at once",
              file=sys.stderr)

    def __bool__(self) -> bool:
        return self.signum is not None

    def exit_if_asked(self, message: str) -> None:
        if self.signum is not None:
            raise Interrupted(f"interrupted ({signal_name(self.signum)}) {message}", self.signum)

def resume_hint(last: Path) -> str:
    """What a stopped training run left: its last good checkpoint and how to continue from it."""
    if not last.exists():
        return "no checkpoint was written yet"
    return f"the last good checkpoint {last} is kept; continue with: python train.py --resume {last}"

# ---------------------------------------------------------------- streams

def chunks(items: list, size: int, weight=len) -> Iterator[list]:
    """Consecutive runs of `items` whose weights sum to at least `size` (the last one may be smaller)."""
    part = []
    total = 0
    for item in items:
        part.append(item)
        total += weight(item)
        if total >= size:
            yield part
            part = []
            total = 0
    if part:
        yield part

def stream_lines(parts: list[list], lines_of, what: str) -> None:
    """Write lines_of(part) to stdout for each part in turn, flushed as each finishes, so an interrupted run keeps
    what it made; an interrupt says how far it got."""
    out = sys.stdout
    done = 0
    total = sum(map(len, parts))
    try:
        for part in parts:
            text = "".join(lines_of(part))
            _write(out, text, f"the output of the first {done} of {total} {what} is complete there")
            done += len(part)
            print(f"{done} of {total} {what} done", file=sys.stderr)
    except KeyboardInterrupt as e:  # Ctrl-C, or an Interrupted by SIGTERM
        signum = getattr(e, "exit_code", 128 + signal.SIGINT) - 128
        raise Interrupted(f"interrupted ({signal_name(signum)}) after {done} of {total} {what}; the output of "
                          f"those {done} is complete on stdout", signum) from None

def _write(out, text: str, kept: str) -> None:
    """Write and flush; UserError naming stdout and saying what it keeps when the system refuses (disk full). A
    closed pipe stays a BrokenPipeError: run() ends quietly on it."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        silence_stdout()
        raise UserError(f"stdout: {os_error_text(e, 'writing')}; {kept}") from None

# ---------------------------------------------------------------- files

UMASK = os.umask(0)  # read once (reading it means setting it), then restored
os.umask(UMASK)

def atomic_write(path, content) -> None:
    """Write str, bytes, or (for any other object) torch.save output to `path` through a temporary file and a
    rename, so a crash leaves either the old file or the new one, never half of one. UserError naming the path
    when the system refuses (disk full, read-only, permission denied), the old file kept."""
    path = Path(path)
    if isinstance(content, str):
        content = content.encode("utf-8")
    elif not isinstance(content, bytes):
        buffer = io.BytesIO()
        torch.save(content, buffer)  # in memory first: torch reports a failed file write as a RuntimeError
        content = buffer.getvalue()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would hide results from the user's group
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, UserError):
            kept = "the previous file is kept" if path.exists() else "nothing was written"
            reason = os_error_text(OSError(e.errno, e.strerror or str(e)), "writing")  # the temp name is noise
            raise UserError(f"{path}: {reason}; {kept}") from None
        raise

def drop_torn_line(path) -> None:
    """Cut a last line left without its newline (a killed run's), so an appending run resumes cleanly."""
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    if blob and not blob.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(blob.rfind(b"\n") + 1)

def read_json(file):
    """A JSON file's content; MissingError if it is absent, UserError naming it if it is not UTF-8 JSON."""
    file = Path(file)
    if not file.is_file():
        raise MissingError(f"{file}: not found")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{file}: not valid JSON ({e})") from None

def weight_files(folder: Path, expected: str) -> list[str]:
    """The safetensors files of a model folder: the shards its model.safetensors.index.json maps,
    else model.safetensors. UserError for an index without a weight_map object, MissingError for an
    absent file (`expected`: what the folder should hold)."""
    index = folder / "model.safetensors.index.json"
    weight_map = read_json(index) if index.exists() else {"weight_map": {"": "model.safetensors"}}
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no weight_map object; expected {{tensor name: shard file}}")
    files = sorted(set(weight_map.values()))
    if not all((folder / f).is_file() for f in files):
        raise MissingError(f"{folder}: missing one of the weight files {files}; expected {expected}")
    return files

def check_tensors(folder: Path, expected: dict, found: dict, unexpected: list[str]) -> None:
    """UserError naming the tensors of a model folder that config.json does not give: `expected` and
    `found` map tensor names to shapes; `unexpected`: the names read that no tensor takes."""
    missing = sorted(set(expected) - set(found))
    if missing or unexpected:
        raise UserError(f"{folder}: tensors do not fit config.json: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)")
    wrong = [f"{name} {tuple(shape)} (config.json: {tuple(expected[name])})" for name, shape in found.items()
             if shape != expected[name]]
    if wrong:
        raise UserError(f"{folder}: tensor shapes do not fit config.json: {', '.join(wrong[:3])} ({len(wrong)} in all)")

def check_rope_buffer(stored: torch.Tensor, want: torch.Tensor, key: str, file: Path, args) -> None:
    """Check a stored `rotary_emb.inv_freq` buffer (D/2,) against the frequencies `want` (D/2,) float32 that
    config.json's rope gives (llama.rope_frequencies of ModelArgs `args`). LLaMA-2 folders of 2023
    (meta-llama/Llama-2-7b-hf, many fine-tunes) keep this non-persistent buffer in their shards, in float32 or,
    after a .half(), float16. It is compared in float32 within the storing dtype's rounding: 4 eps relative, plus
    the spacing of its subnormals for the smallest frequencies. UserError naming the key and file for another
    shape or other values (e.g. a scaled rope config.json does not say)."""
    if stored.shape != want.shape:
        raise UserError(f"{file}: {key} has shape {tuple(stored.shape)}; config.json gives head_dim "
                        f"{args.head_dim}, so expected ({args.head_dim // 2},)")
    info = torch.finfo(stored.dtype) if stored.dtype.is_floating_point else torch.finfo(torch.float32)
    tol = 4 * info.eps * want.abs() + info.smallest_normal * info.eps  # (D/2,)
    err = (stored.float().cpu() - want).abs()
    if not (err <= tol).all():
        worst = int((err / want.abs()).argmax())
        raise UserError(f"{file}: {key} holds rotary frequencies other than config.json's (rope_theta "
                        f"{args.rope_theta}, rope_scaling {args.rope_scaling}): frequency {worst} is "
                        f"{stored[worst].item():.6g}, expected {want[worst].item():.6g}")

def shown(path) -> str:
    """How messages name a path: "-" is standard input."""
    return "<stdin>" if str(path) == "-" else str(path)

def read_text(path) -> str:
    """A file's text ("-": stdin's) as strict UTF-8, BOM removed; MissingError, or UserError naming file:line."""
    if str(path) == "-":
        blob = sys.stdin.buffer.read()
        path = shown(path)
    elif Path(path).is_dir():
        raise UserError(f"{path}: a folder; expected a file")
    elif Path(path).exists():  # a file, a FIFO, /dev/stdin, <(process substitution)
        blob = Path(path).read_bytes()
    else:
        raise MissingError(f"{path}: not found")
    try:
        return blob.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: byte {blob[e.start]:#04x} is not UTF-8") from None

def jsonl_records(path) -> Iterator[tuple[str, object]]:
    """Yield ("file:line", record) per non-blank line of a JSON-lines file; UserError there for a line not JSON."""
    name = shown(path)
    for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: U+2028 may sit in a text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{n}: JSONDecodeError: {e}; expected one JSON object per line") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise UserError(f"{name}:{n}: {str(e).split(';')[0]}; expected one JSON object per line") from None
        except RecursionError:
            raise UserError(f"{name}:{n}: values nested too deeply; expected one JSON object per line") from None
        yield f"{name}:{n}", record

def csv_rows(path, columns, ints=(), multiline: bool = False) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", row) per CSV record (its first line), the `ints` columns as int. UserError for a missing
    column, a header and no rows, a short row, a non-integer in `ints`, or (unless multiline) a line break in a
    field: in a file that has none, it is an unclosed quote that swallowed the rows after it."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    path = shown(path)
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}:1: missing column(s) {missing}; header is {header}")
    first = reader.line_num + 1
    start = first
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not multiline and any("\n" in v or "\r" in v for v in row.values() if isinstance(v, str)):
            raise UserError(f"{where}: a field holds a line break (an unclosed quote?) up to line {start - 1}")
        if any(row[c] is None for c in columns):
            raise UserError(f"{where}: row has fewer than {len(header)} fields")
        for c in ints:
            if not re.fullmatch(r"[0-9]{1,18}", row[c].strip()):  # isdigit() also passes "²", which int() fails
                raise UserError(f"{where}: column {c} is {row[c][:40]!r}; expected an integer (digits 0-9)")
            row[c] = int(row[c])
        yield where, row
    if start == first:
        raise UserError(f"{path}: a header and no rows")

def read_checkpoint(path, keys=("config", "lora")) -> dict:
    """A train.py checkpoint as a dict on the CPU, or a UserError that says what the file is instead. Checked in
    order: not found; empty; a safetensors file (a model, not a checkpoint); not a torch file; truncated; holding
    objects other than tensors and containers (refused: unpickling them could run code); missing one of `keys`.
    torch.load runs with weights_only=True, always."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder; expected a checkpoint file such as {path / 'ckpt.pt'} "
                        "(a model folder goes to --model)")
    if not path.is_file():
        raise MissingError(f"{path}: checkpoint not found")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file; expected a checkpoint written by train.py")
    with open(path, "rb") as f:
        head = f.read(9)
    if size > 8 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        raise UserError(f"{path}: a safetensors file (model weights); expected a checkpoint (ckpt.pt) "
                        "written by train.py; a model folder goes to --model")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch checkpoint (truncated, or another kind of file)")
    damaged = zipfile.ZipFile(path).testzip()  # the first entry whose bytes fail their CRC, or None
    if damaged:
        raise UserError(f"{path}: corrupt: {damaged} fails its checksum; use an intact copy (or ckpt_last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused: it holds Python objects other than tensors and containers, and "
                        "unpickling them could run code; it is not a DialogueLLM checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: unreadable torch file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: holds a {type(ckpt).__name__}; expected a train.py checkpoint (a dict)")
    for key in keys:
        if key not in ckpt:
            hint = "; to resume, give ckpt_last.pt (ckpt.pt keeps only the best adapter)" if key == "optimizer" else ""
            raise UserError(f"{path}: missing key {key!r}{hint}")
    adapter = ckpt.get("lora", {})
    if not isinstance(adapter, dict) or not all(torch.is_tensor(t) and t.isfinite().all() for t in adapter.values()):
        raise UserError(f"{path}: its adapter ('lora') is not a dict of finite tensors")
    return ckpt

# ---------------------------------------------------------------- vision.py's flags

def vision_args(argv, description: str, splits: list[str]) -> argparse.Namespace:
    """vision.py's flags, checked before any work: UsageError, or MissingError for --videos."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.epilog = "Flags are checked before any work. Exit status 1 when a clip failed; a rerun retries it."
    p.add_argument("--videos", type=Path, required=True, help="folder of dia{D}_utt{U}.mp4 clips, or MELD.Raw")
    p.add_argument("--data", default="meld", choices=["meld"], help="the dataset with video clips")
    p.add_argument("--data-dir", help="the folder holding meld/ (default: $DIALOGUELLM_DATA, else ./data)")
    p.add_argument("--split", required=True, choices=splits)
    p.add_argument("--out", type=Path, required=True, help="JSONL, appended to; a rerun skips what it holds")
    p.add_argument("--endpoint", required=True, help="API base URL; the key comes from $DIALOGUELLM_VLM_KEY")
    p.add_argument("--model", required=True, help="a model name the endpoint serves")
    p.add_argument("--frames", type=positive_int, default=4)
    args = p.parse_args(argv)
    if not args.endpoint.startswith(("http://", "https://")):
        raise UsageError(f"--endpoint {args.endpoint!r}: expected a URL such as http://127.0.0.1:8080/v1")
    if not args.videos.is_dir():
        raise MissingError(f"--videos {args.videos}: no such folder")
    if args.out.is_dir() or not os.access(args.out if args.out.exists() else args.out.parent, os.W_OK):
        raise UsageError(f"--out {args.out}: expected a writable file, or one to create in a writable folder")
    return args

# ---------------------------------------------------------------- eval.py's flags, results folder and printing

def eval_parser(description: str, splits, window: int) -> argparse.ArgumentParser:
    """eval.py's flags (the splits and the default window are data.py's)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("ckpt", nargs="?", help="checkpoint from train.py (omit with --zero-shot)")
    p.add_argument("--data", help="meld, emorynlp, iemocap, a comma list or all (default: the trained ones)")
    p.add_argument("--split", choices=splits, help="default: test")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=positive_int, help="the first N utterances only")
    p.add_argument("--descriptions", help="video descriptions JSONL; described utterances are also scored without")
    p.add_argument("--described-only", action="store_true", help="only the utterances that have a description")
    p.add_argument("--generate", action="store_true", help="greedy decoding instead of label scoring")
    p.add_argument("--no-calibration", action="store_true", help="ignore the label offsets fitted on dev")
    p.add_argument("--zero-shot", action="store_true", help="the base model --model with no adapter")
    p.add_argument("--model", default="default", help="base model for --zero-shot, or the new place of a "
                   "checkpoint's base model folder (its shapes are checked)")
    p.add_argument("--window", type=natural_int, help=f"--zero-shot: context window (default {window})")
    p.add_argument("--max-len", type=positive_int, help="prompt + answer tokens (default: the checkpoint's)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", help="parent folder of the results (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input", help="label your own conversations: a JSONL or CSV file, or - for stdin")
    p.add_argument("--format", choices=("jsonl", "csv"), help="--input's format (default: from its name)")
    p.add_argument("--label-set", help="--input: the labels of this trained dataset (default: the first)")
    return p

def eval_args(argv, description: str, splits, window: int, datasets) -> argparse.Namespace:
    """eval.py's flags, checked before any work: --input (labelling) takes none of evaluation's flags,
    --window goes with --zero-shot, a checkpoint or --zero-shot."""
    p = eval_parser(description, splits, window)
    a = p.parse_args(argv)
    flags = {"--data": a.data, "--split": a.split, "--limit": a.limit, "--descriptions": a.descriptions,
             "--generate": a.generate, "--zero-shot": a.zero_shot, "--max-len": a.max_len, "--out": a.out}
    given = [flag for flag, value in flags.items() if value]
    if a.input and given:
        raise UsageError(f"--input labels with the checkpoint's settings; it takes no {', '.join(given)}")
    if not a.input and (a.format or a.label_set):
        raise UsageError("--format and --label-set go with --input")
    a.format = a.format or {".jsonl": "jsonl", ".csv": "csv"}.get(Path(a.input or "").suffix.lower())
    if a.input and not a.format:
        raise UsageError(f"--input {a.input}: give --format jsonl or csv (or a name ending .jsonl or .csv)")
    a.split = a.split or "test"
    if a.window is not None and not a.zero_shot:
        raise UsageError("--window goes with --zero-shot; a checkpoint's evaluation uses its own window")
    if a.window is None:
        a.window = window
    if a.zero_shot == bool(a.ckpt):
        p.error("give a checkpoint, or --zero-shot (not both)")
    if a.described_only and not a.descriptions:
        p.error("--described-only needs --descriptions")
    if a.data:
        check_names("--data", a.data.split(","), (*datasets, "all"))
    check_device(a.device)
    return a

def results_dir(a: argparse.Namespace, trained_data: str) -> Path:
    """This evaluation's folder: its name encodes every option that changes the results, so variants never share
    a folder, while the same evaluation run again replaces its own."""
    parent = Path(a.out or (Path(a.ckpt).parent if a.ckpt else "runs/zero-shot"))
    options = [  # (option given, its part of the name)
        (a.data and a.data != trained_data, str(a.data).replace(",", "+")),
        (a.descriptions, "descriptions-" + Path(a.descriptions or "").stem),
        (a.described_only, "described"),
        (a.limit, f"limit{a.limit}"),
        (a.max_len, f"len{a.max_len}"),
        (a.generate, "generate"),
        (a.no_calibration and not a.generate, "uncalibrated"),
        (a.ckpt and Path(a.ckpt).stem != "ckpt", Path(a.ckpt or "").stem),  # e.g. ckpt_last: no label offsets
        (a.zero_shot, f"{Path(a.model).name}-window{a.window}"),
    ]
    return parent / "-".join([f"eval-{a.split}"] + [part for given, part in options if given])

def show_results(title: str, res: dict, split: str) -> None:
    """One line per dataset: weighted F1 (and without the label offsets, when they were applied), accuracy..."""
    before = res.get("uncalibrated_weighted_f1", {})
    for name, m in res.items():
        if isinstance(m, dict) and "weighted_f1" in m:
            offsets = name in res.get("calibrated_datasets", []) or (name == "union" and res.get("calibrated"))
            raw = f" ({100 * before[name]:.2f} without the dev-fitted label offsets)" if offsets else ""
            print(f"{title}{name} {split}: weighted F1 {100 * m['weighted_f1']:.2f}{raw}  accuracy "
                  f"{100 * m['accuracy']:.2f}  macro F1 {100 * m['macro_f1']:.2f}  invalid {m['invalid']}  n={m['n']}")

def show_comparison(res: dict, split: str) -> None:
    """Print eval.compare_descriptions' result: the described utterances scored with and without."""
    print(f"{res['n']} of {res['records']} descriptions matched an utterance of {split}")
    show_results("  with it:    ", res["with_description"], split)
    show_results("  without it: ", res["without"], split)

def show_classes(m: dict) -> None:
    """Per-class precision, recall, F1 (%) and support, then the confusion matrix (rows gold, columns predicted)."""
    labels = m["labels"]
    width = max(len("gold / predicted"), *map(len, labels)) + 2
    print(f"{'':{width}}precision  recall      F1  support")
    for label in labels:
        c = m["per_class"][label]
        scores = f"{100 * c['precision']:9.2f}{100 * c['recall']:8.2f}{100 * c['f1']:8.2f}"
        print(f"{label:{width}}{scores}{c['support']:9d}")
    print("gold / predicted".ljust(width) + "".join(f"{label[:8]:>9}" for label in labels))
    for label, row in zip(labels, m["confusion"]):
        print(f"{label:{width}}" + "".join(f"{n:9d}" for n in row))

def write_results(out: Path, res: dict, rows: list[dict]) -> None:
    """eval.py's closing: the predicted labels' counts, then metrics.json and predictions.jsonl in the
    results folder `out`, each written whole."""
    print("predicted:", dict(Counter(r["pred"] for r in rows).most_common()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", json.dumps(res, indent=1))
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'} ({res['seconds']} s)")
