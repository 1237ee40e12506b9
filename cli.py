"""What every script shares at its edge: the user's errors, flag checks, safe file writes and checkpoint reads.

A script raises UserError (UsageError for a bad flag) for anything the user can fix: a bad flag, file, data row,
checkpoint or endpoint. `run(main)` turns it into one line `<script>: error: <message>` and a non-zero exit; any
other exception is a bug and keeps its traceback. DIALOGUELLM_DEBUG=1 shows the traceback of user errors too.
"""
import argparse
import csv
import io
import json
import math
import os
import pickle
import sys
import tempfile
import zipfile
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

def run(main) -> None:
    """Call main() and exit: 0 on success, 1 or 2 with one line on stderr for a UserError."""
    prog = Path(sys.argv[0]).name
    try:
        status = main()
    except UserError as e:
        if os.environ.get("DIALOGUELLM_DEBUG") == "1":
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(status if isinstance(status, int) else 0)

# ---------------------------------------------------------------- flag types for argparse

def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value

def positive_int(text: str) -> int:
    if _number(int, text) <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return int(text)

def natural_int(text: str) -> int:
    if _number(int, text) < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)

def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value

def fraction(text: str) -> float:
    """A probability in [0, 1), such as a dropout rate."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value

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
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {parent} is not a writable folder")

def claim_run_folder(out, run_files, overwrite: bool) -> None:
    """Create --out for a new run; UsageError if it holds one of run_files, unless overwrite (which deletes them)."""
    out = Path(out)
    check_writable(out)
    found = [name for name in run_files if (out / name).exists()]
    if found and not overwrite:
        resume = f"continue it with --resume {out / 'ckpt_last.pt'}, or " if "ckpt_last.pt" in found else ""
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); {resume}replace it with --overwrite")
    for name in found:
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)

# ---------------------------------------------------------------- files

def atomic_write(path, content) -> None:
    """Write str, bytes, or (for any other object) torch.save output to `path` through a temporary file and a
    rename, so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
            else:
                torch.save(content, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
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

def shown(path) -> str:
    """How messages name a path: "-" is standard input."""
    return "<stdin>" if str(path) == "-" else str(path)

def read_text(path) -> str:
    """A file's text ("-": stdin's) as strict UTF-8, BOM removed; MissingError, or UserError naming file:line."""
    if str(path) == "-":
        blob = sys.stdin.buffer.read()
        path = shown(path)
    elif Path(path).is_file():
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
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{n}: JSONDecodeError: {e}; expected one JSON object per line") from None

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
            if not row[c].strip().isdigit():
                raise UserError(f"{where}: column {c} is {row[c]!r}; expected an integer")
            row[c] = int(row[c])
        yield where, row
    if start == first:
        raise UserError(f"{path}: a header and no rows")

def read_checkpoint(path, keys=("config", "lora")) -> dict:
    """A train.py checkpoint as a dict on the CPU, or a UserError that says what the file is instead.

    Checked in order: not found; empty; a safetensors file (a model, not a checkpoint); not a torch file;
    truncated; holding objects other than tensors and containers (refused: unpickling them could run code);
    missing one of `keys`. torch.load runs with weights_only=True, always.
    """
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
