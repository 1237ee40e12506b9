"""Every kind of bad input gets one clear line (issue 11), end to end through each script's `__main__`.

Each case runs a script with one bad flag, file, checkpoint or folder and asserts: a non-zero exit (2 for a
usage error, 1 otherwise); no traceback; a last stderr line `<script>: error: ...` naming the flag, file, line
or key; no file that existed before changed. Flags fail before a model loads, so the cases are cheap; the
cost is importing torch. Every case runs in a fork of one process that imported torch once (LAUNCHER): the
script runs as `__main__` with its own argv, environment, stdout and stderr, and exits as `python script`
would (uncaught exceptions print their traceback, exit 1). BAD_INPUT_PLAIN=1 runs each case as a plain
`python <script>` subprocess instead (slower, same results); test_launcher_matches_plain_python checks one.
"""
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint, make_meld

ROOT = Path(__file__).resolve().parents[1]
JOBS = 4  # cases at a time: most finish in a fraction of a second once torch is imported

# Imports torch and the scripts' modules once, waits for cases.json, then forks one child per case, `jobs` at a
# time; a child runs its script as __main__ and exits with the status `python script` would give (a traceback
# and 1 for an uncaught exception). argv: cases.json, results folder, jobs. Writes <id>.out/.err/.json.
LAUNCHER = r'''
import importlib, json, os, runpy, signal, sys, time, traceback
sys.path[0] = os.getcwd()
for name in ("torch", "torch._dynamo", "safetensors", "sentencepiece", "tabulate", "av",  # slow to import
             "cli", "llama", "lora", "convert", "data", "eval", "train", "vision"):  # the scripts run as __main__
    try:
        importlib.import_module(name)
    except Exception:  # a child importing it again shows the error where it belongs
        pass
started = time.time()
parent = os.getppid()
while not os.path.exists(sys.argv[1]):  # written once every case's files are there
    if os.getppid() != parent:  # pytest is gone
        sys.exit(1)
    time.sleep(0.02)
cases, results, jobs = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
waited = time.time() - started

def child(case):
    for kind, fd in (("out", 1), ("err", 2)):
        f = os.open(os.path.join(results, case["id"] + "." + kind), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(case["env"])
    sys.argv = [case["script"], *case["argv"]]
    code = 0
    try:
        runpy.run_path(case["script"], run_name="__main__")
    except SystemExit as e:  # as the interpreter reads sys.exit's argument
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

pending = list(cases)
running = {}  # pid -> (case, start)
while pending or running:
    while pending and len(running) < jobs:
        case = pending.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = (case, time.time())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        for other, (case, start) in running.items():
            if time.time() - start > case["timeout"]:
                os.kill(other, signal.SIGKILL)
        time.sleep(0.01)
        continue
    case, start = running.pop(pid)
    with open(os.path.join(results, case["id"] + ".json"), "w") as f:
        json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - start, 2)}, f)
print(f"launcher: imports done {waited:.1f} s before the cases; ran them in {time.time() - started - waited:.1f} s")
'''


@dataclass
class Case:
    id: str
    script: str
    build: object  # (case folder, Shared) -> argv; writes the files the case needs into the case folder
    expect: str | tuple  # substring(s) of the last stderr line
    rc: int = 2
    absent: tuple = ()  # strings that must appear in neither stdout nor stderr
    timeout: float = 120


@dataclass
class Shared:
    model: Path  # a tiny HF LLaMA folder with tok512
    data: Path  # a tiny synthetic MELD ($DIALOGUELLM_DATA of every case)
    ckpt: bytes  # a valid train.py ckpt.pt of that model (adapter, no optimizer state)
    ckpt_last: bytes  # the same with optimizer state, as ckpt_last.pt


# ---------------------------------------------------------------- what the cases need

EARLIER = {"metrics.jsonl": '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n',
           "eval-test/metrics.json": '{"meld": {"weighted_f1": 0.61, "n": 2610}}',
           "eval-test/predictions.jsonl": '{"dialogue_id": 0, "utterance_id": 0, "pred": "joy"}\n'}


def run_folder(d: Path, fx: Shared) -> Path:
    """A finished run with an earlier full evaluation: ckpt.pt, ckpt_last.pt, metrics.jsonl, eval-test/."""
    run = d / "run"
    (run / "eval-test").mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(fx.ckpt)
    (run / "ckpt_last.pt").write_bytes(fx.ckpt_last)
    for name, text in EARLIER.items():
        (run / name).write_text(text)
    return run


def ckpt_file(d: Path, content, name="ckpt.pt") -> str:
    """A checkpoint file holding `content`: bytes as they are, anything else through torch.save."""
    path = d / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


def meld_with(d: Path, fx: Shared, split: str, edit) -> str:
    """A copy of the synthetic MELD with one split's lines (header first) passed through `edit`, which returns
    lines or bytes; returns the data folder."""
    root = d / "data"
    shutil.copytree(fx.data, root)
    path = root / "meld" / f"{split}_sent_emo.csv"
    new = edit(path.read_text().splitlines())
    path.write_bytes(new if isinstance(new, bytes) else ("\n".join(new) + "\n").encode())
    return str(root)


def row(dialogue="7", utterance="0", label="joy", text="hello there") -> str:
    return f'99,{text},Speaker0,{label},neutral,{dialogue},{utterance},1,1,"00:00:01,000","00:00:02,000"'


def unclosed_quote(lines):
    return [*lines[:3], lines[3][:-1], *lines[4:]]  # line 4's last field opens a quote that line 5 closes


def stats(data_dir, fx: Shared, *more) -> list[str]:
    return ["--stats", "--data-dir", data_dir, "--model", str(fx.model), *more]


DESCRIPTION = dict(dataset="meld", split="test", dialogue_id=0, utterance_id=0, description="a man smiles")


def descriptions(d: Path, *records, raw: bytes | None = None) -> str:
    """A descriptions JSONL: one good record, then `records` (dicts, or lines as they are)."""
    path = d / "descriptions.jsonl"
    lines = [json.dumps(DESCRIPTION)] + [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode())
    return str(path)


def train(fx: Shared, d: Path, *flags) -> list[str]:
    """train.py flags with a fresh --out of the case's own; `flags` come last and win."""
    return ["--model", str(fx.model), "--device", "cpu", "--out", str(d / "out"), *flags]


def vision(d: Path, *flags) -> list[str]:
    """vision.py flags that pass its checks, but for `flags` (pairs: name without --, value; None drops it)."""
    (d / "videos").mkdir(exist_ok=True)
    base = dict(videos=str(d / "videos"), split="test", out=str(d / "d.jsonl"), endpoint="http://127.0.0.1:9/v1",
                model="m")
    given = dict(zip(flags[::2], flags[1::2]))
    return [x for key, value in {**base, **given}.items() if value is not None for x in ("--" + key, value)]


def model_folder(d: Path, fx: Shared, config: str | None) -> str:
    """A copy of the tiny model whose config.json holds `config` (None: no config.json)."""
    folder = d / "model"
    shutil.copytree(fx.model, folder)
    if config is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config)
    return str(folder)


class Payload:
    """Any class: pickled into a checkpoint, it is what weights_only loading refuses."""


def random_bytes(n=4096) -> bytes:
    blob = bytearray(random.Random(0).randbytes(n))
    blob[8] = 0  # not '{': a safetensors file is told apart by that byte
    return bytes(blob)


def run_of(fx: Shared, d: Path) -> str:
    """The ckpt.pt of a run_folder in d."""
    return str(run_folder(d, fx) / "ckpt.pt")


def corrupt(blob: bytes, member: str, fill: bytes) -> bytes:
    """A checkpoint (a zip) with the middle half of one member's stored bytes overwritten by `fill`: its size
    and the zip directory stay, only the member's CRC no longer matches."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.filename.endswith(member))
    at = info.header_offset
    name_len = int.from_bytes(blob[at + 26:at + 28], "little")
    extra_len = int.from_bytes(blob[at + 28:at + 30], "little")
    start = at + 30 + name_len + extra_len  # a 30-byte local header, the name, the extra field, then the data
    n = info.compress_size // 2
    return blob[:start + n // 2] + fill * n + blob[start + n // 2 + n:]


def resume_from_another_version(d: Path, fx: Shared) -> str:
    """A ckpt_last.pt whose config has a field this train.py does not know (a flag since renamed or removed)."""
    ckpt = torch.load(io.BytesIO(fx.ckpt_last), weights_only=True)
    ckpt["config"].update(compile=True, out=str(d / "run"))
    return ckpt_file(d, ckpt, "ckpt_last.pt")


def base_model_gone(d: Path, fx: Shared) -> str:
    """A valid checkpoint whose base model folder is no longer there."""
    ckpt = torch.load(io.BytesIO(fx.ckpt), weights_only=True)
    ckpt["config"]["model"] = str(d / "gone")
    return ckpt_file(d, ckpt)


# ---------------------------------------------------------------- the cases

CASES = [
    # results destroyed: earlier results stay as they were
    Case("eval_limit_zero", "eval.py", lambda d, fx: [run_of(fx, d), "--limit", "0"], "argument --limit"),
    Case("eval_limit_negative", "eval.py", lambda d, fx: [run_of(fx, d), "--limit", "-5"], "argument --limit"),
    Case("train_into_an_existing_run", "train.py",
         lambda d, fx: train(fx, d, "--out", str(run_folder(d, fx))), "--overwrite"),
    Case("train_out_is_a_file", "train.py",
         lambda d, fx: train(fx, d, "--out", str(run_folder(d, fx) / "metrics.jsonl")), "--out"),
    Case("eval_out_under_a_file", "eval.py",
         lambda d, fx: [run_of(fx, d), "--out", str(d / "run/metrics.jsonl/evals")], "--out"),
    Case("convert_descriptions_out_under_a_file", "data.py",
         lambda d, fx: ["--convert-descriptions", descriptions(d), str(d / "descriptions.jsonl/x/out.jsonl")],
         "--convert-descriptions OUT"),
    # false success: refused as a flag, never a run that "succeeds" without training
    Case("train_lr_nan", "train.py", lambda d, fx: train(fx, d, "--lr", "nan"), "argument --lr"),
    Case("train_lr_inf", "train.py", lambda d, fx: train(fx, d, "--lr", "inf"), "argument --lr"),
    Case("train_lr_negative", "train.py", lambda d, fx: train(fx, d, "--lr", "-0.001"), "argument --lr"),
    Case("train_epochs_zero", "train.py", lambda d, fx: train(fx, d, "--epochs", "0"), "argument --epochs"),
    Case("train_max_steps_negative", "train.py", lambda d, fx: train(fx, d, "--max-steps", "-1"),
         "argument --max-steps"),
    Case("train_data_smaller_than_one_step", "train.py",  # 24 examples, batch 8 x 64 micro-batches: no step
         lambda d, fx: train(fx, d, "--batch-size", "8", "--grad-accum", "64", "--targets", "wq", "--r", "2"),
         ("24 training examples", "--grad-accum"), rc=1, absent=("adapter in",)),
    # unchecked flags
    Case("train_batch_size_zero", "train.py", lambda d, fx: train(fx, d, "--batch-size", "0"),
         "argument --batch-size"),
    Case("eval_batch_size_negative", "eval.py", lambda d, fx: [run_of(fx, d), "--batch-size", "-1"],
         "argument --batch-size"),
    Case("train_grad_accum_zero", "train.py", lambda d, fx: train(fx, d, "--grad-accum", "0"),
         "argument --grad-accum"),
    Case("train_dev_limit_zero", "train.py", lambda d, fx: train(fx, d, "--dev-limit", "0"), "argument --dev-limit"),
    Case("train_calibrate_misspelt", "train.py", lambda d, fx: train(fx, d, "--calibrate", "ture"),
         "argument --calibrate"),
    Case("train_grad_ckpt_not_a_boolean", "train.py", lambda d, fx: train(fx, d, "--grad-ckpt", "on"),
         "argument --grad-ckpt"),
    Case("train_dropout_one", "train.py", lambda d, fx: train(fx, d, "--dropout", "1"), "argument --dropout"),
    Case("train_weight_decay_negative", "train.py", lambda d, fx: train(fx, d, "--weight-decay", "-0.1"),
         "--weight-decay"),
    Case("train_cuda_without_gpu", "train.py", lambda d, fx: train(fx, d, "--device", "cuda"), "--device cuda"),
    Case("eval_cuda_without_gpu", "eval.py", lambda d, fx: [run_of(fx, d), "--device", "cuda"], "--device cuda"),
    Case("train_device_xla", "train.py", lambda d, fx: train(fx, d, "--device", "xla"), "--device xla"),
    Case("train_device_not_a_name", "train.py", lambda d, fx: train(fx, d, "--device", "gpu"), "--device"),
    Case("train_unknown_dataset", "train.py", lambda d, fx: train(fx, d, "--data", "friends"), ("--data", "emorynlp")),
    Case("eval_unknown_dataset", "eval.py", lambda d, fx: [run_of(fx, d), "--data", "meld,friends"],
         ("--data", "emorynlp")),
    Case("data_unknown_dataset", "data.py", lambda d, fx: stats(fx.data, fx, "--data", "mled"), "--data"),
    Case("eval_unknown_split", "eval.py", lambda d, fx: [run_of(fx, d), "--split", "validation"], "argument --split"),
    Case("train_unknown_lora_target", "train.py", lambda d, fx: train(fx, d, "--targets", "wq,q_proj"),
         ("--targets", "wq, wk, wv, wo, w1, w2, w3")),
    Case("eval_window_negative", "eval.py",
         lambda d, fx: ["--zero-shot", "--model", str(fx.model), "--window", "-1"], "argument --window"),
    Case("eval_neither_checkpoint_nor_zero_shot", "eval.py", lambda d, fx: ["--limit", "3"], "--zero-shot"),
    Case("eval_described_only_without_descriptions", "eval.py", lambda d, fx: [run_of(fx, d), "--described-only"],
         "--descriptions"),
    Case("train_export_without_from", "train.py", lambda d, fx: ["--export-peft", str(d / "peft")], "--from"),
    Case("train_gpu_mem_zero", "train.py", lambda d, fx: train(fx, d, "--dry-run", "--gpu-mem", "0"),
         "argument --gpu-mem"),
    Case("data_nothing_to_do", "data.py", lambda d, fx: [], "--stats"),
    # checkpoints: say what the file is instead
    Case("eval_checkpoint_missing", "eval.py", lambda d, fx: [str(d / "runs/ckpt.pt")],
         "runs/ckpt.pt: checkpoint not found", rc=1),
    Case("eval_checkpoint_empty", "eval.py", lambda d, fx: [ckpt_file(d, b"")], "empty file", rc=1),
    Case("eval_checkpoint_random_bytes", "eval.py", lambda d, fx: [ckpt_file(d, random_bytes())],
         "not a torch checkpoint", rc=1),
    Case("eval_checkpoint_truncated_zip", "eval.py", lambda d, fx: [ckpt_file(d, fx.ckpt[:len(fx.ckpt) // 2])],
         "truncated", rc=1),
    Case("eval_checkpoint_corrupt_pickle", "eval.py",  # zero bytes: a corrupt file, not a pickled payload
         lambda d, fx: [ckpt_file(d, corrupt(fx.ckpt, "data.pkl", b"\0"))],
         ("ckpt.pt: corrupt", "data.pkl fails its checksum"), rc=1,
         absent=("could run code",)),
    Case("eval_checkpoint_corrupt_tensor", "eval.py",  # 0xff bytes: NaN adapter weights
         lambda d, fx: [ckpt_file(d, corrupt(fx.ckpt, "data/0", b"\xff"))],
         ("ckpt.pt: corrupt", "data/0 fails its checksum"), rc=1),
    Case("eval_checkpoint_is_safetensors", "eval.py",
         lambda d, fx: [ckpt_file(d, (fx.model / "model.safetensors").read_bytes(), "model.safetensors")],
         "safetensors", rc=1),
    Case("eval_checkpoint_without_config", "eval.py", lambda d, fx: [ckpt_file(d, {"lora": {}})], "'config'", rc=1),
    Case("eval_checkpoint_config_without_keys", "eval.py", lambda d, fx: [ckpt_file(d, {"config": {}, "lora": {}})],
         ("ckpt.pt: its config lacks", "'lora_alpha'"), rc=1),
    Case("eval_checkpoint_holds_a_list", "eval.py", lambda d, fx: [ckpt_file(d, [1, 2])], "list", rc=1),
    Case("eval_checkpoint_pickled_payload", "eval.py",
         lambda d, fx: [ckpt_file(d, {"config": {}, "lora": {}, "payload": Payload()})], "refused", rc=1,
         absent=("weights_only=False",)),
    Case("train_resume_pickled_payload", "train.py",
         lambda d, fx: ["--resume", ckpt_file(d, {"config": {}, "lora": {}, "payload": Payload()})], "refused",
         rc=1, absent=("weights_only=False",)),
    Case("train_resume_best_not_last", "train.py", lambda d, fx: ["--resume", run_of(fx, d)],
         ("ckpt.pt: missing key 'optimizer'", "give ckpt_last.pt"), rc=1),
    Case("train_resume_with_other_flags", "train.py",  # a resumed run is the saved run: flags are not ignored
         lambda d, fx: ["--resume", str(run_folder(d, fx) / "ckpt_last.pt"), "--lr", "5"], ("--resume", "--lr")),
    Case("eval_checkpoint_is_a_folder", "eval.py", lambda d, fx: [str(run_folder(d, fx))], ("a folder", "ckpt.pt"),
         rc=1),
    Case("eval_window_with_a_checkpoint", "eval.py", lambda d, fx: [run_of(fx, d), "--window", "4"],
         ("--window", "--zero-shot")),
    Case("train_resume_config_of_another_version", "train.py",
         lambda d, fx: ["--resume", resume_from_another_version(d, fx)], ("ckpt_last.pt", "compile"), rc=1),
    Case("train_export_random_bytes", "train.py",
         lambda d, fx: ["--export-peft", str(d / "peft"), "--from", ckpt_file(d, random_bytes())],
         "not a torch checkpoint", rc=1),
    Case("eval_checkpoint_base_model_gone", "eval.py", lambda d, fx: [base_model_gone(d, fx)], "gone", rc=1),
    # model folders
    Case("model_without_config_json", "train.py",
         lambda d, fx: train(fx, d, "--dry-run", "--model", model_folder(d, fx, None)),
         ("model: no config.json there",), rc=1),
    Case("model_config_json_not_json", "train.py",
         lambda d, fx: train(fx, d, "--dry-run", "--model", model_folder(d, fx, "{'hidden_size': 64,")),
         ("model/config.json: not valid JSON",), rc=1),
    Case("model_config_json_without_keys", "train.py",
         lambda d, fx: train(fx, d, "--dry-run", "--model", model_folder(d, fx, '{"hidden_size": 64}')),
         ("model/config.json: not a LLaMA config", "num_attention_heads"), rc=1),
    # bad data files: the file and line
    Case("split_header_and_no_rows", "data.py", lambda d, fx: stats(meld_with(d, fx, "test", lambda L: L[:1]), fx),
         ("test_sent_emo.csv: a header and no rows",), rc=1),
    Case("split_duplicate_ids", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "dev", lambda L: [*L, row("0", "1")]), fx),
         ("dev_sent_emo.csv:26", "dev_sent_emo.csv:3)"), rc=1),
    Case("split_unclosed_quote", "data.py", lambda d, fx: stats(meld_with(d, fx, "train", unclosed_quote), fx),
         ("train_sent_emo.csv:4", "unclosed quote"), rc=1),
    Case("split_id_not_an_integer", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "train", lambda L: [*L, row(dialogue="x")]), fx),
         ("train_sent_emo.csv:26", "Dialogue_ID"), rc=1),
    Case("split_unknown_label", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "train", lambda L: [*L, row(label="happy")]), fx),
         ("train_sent_emo.csv:26: unknown meld label 'happy'",), rc=1),
    Case("split_missing_column", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "train", lambda L: [L[0].replace("Emotion", "Emo"), *L[1:]]), fx),
         "Emotion", rc=1),
    Case("split_short_row", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "train", lambda L: [*L, "99,hello,Speaker0"]), fx),
         ("train_sent_emo.csv:26: row has fewer than 11 fields",), rc=1),
    Case("split_not_utf8", "data.py",
         lambda d, fx: stats(meld_with(d, fx, "dev", lambda L: ("\n".join(L[:3]) + "\n").encode()
                                       + row(text="caf\xe9").encode("latin-1") + b"\n"), fx),
         ("dev_sent_emo.csv:4: byte 0xe9 is not UTF-8",), rc=1),
    Case("eval_on_a_split_without_rows", "eval.py",
         lambda d, fx: [run_of(fx, d), "--data-dir", meld_with(d, fx, "test", lambda L: L[:1]), "--out",
                        str(d / "evals")],
         ("test_sent_emo.csv: a header and no rows",), rc=1),
    Case("descriptions_id_a_string", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, {**DESCRIPTION, "dialogue_id": "0"})),
         ("descriptions.jsonl:2", "'dialogue_id'"), rc=1),
    Case("descriptions_description_a_number", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions",
                             descriptions(d, {**DESCRIPTION, "utterance_id": 1, "description": 5})),
         ("descriptions.jsonl:2", "'description'"), rc=1),
    Case("descriptions_record_a_list", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, "[1, 2]")),
         ("descriptions.jsonl:2: a JSON list",), rc=1),
    Case("descriptions_missing_key", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, {"dataset": "meld", "split": "test"})),
         ("descriptions.jsonl:2: KeyError: missing key(s) ['dialogue_id', 'utterance_id', 'description']",), rc=1),
    Case("descriptions_line_not_json", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, '{"dataset": "meld",')),
         ("descriptions.jsonl:2: JSONDecodeError",), rc=1),
    Case("descriptions_not_utf8", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, raw=json.dumps(DESCRIPTION).encode()
                                                                          + b'\n{"description": "caf\xe9"}\n')),
         ("descriptions.jsonl:2: byte 0xe9 is not UTF-8",), rc=1),
    Case("descriptions_twice", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", descriptions(d, DESCRIPTION)),
         ("descriptions.jsonl:2: a second description of ('meld', 'test', 0, 0)",), rc=1),
    Case("descriptions_missing", "data.py",
         lambda d, fx: stats(fx.data, fx, "--descriptions", str(d / "none.jsonl")),
         ("none.jsonl: not found",), rc=1),
    Case("eval_descriptions_wrong_type", "eval.py",
         lambda d, fx: ["--zero-shot", "--model", str(fx.model), "--out", str(d / "evals"), "--descriptions",
                        descriptions(d, {**DESCRIPTION, "utterance_id": 1.0})],
         ("descriptions.jsonl:2", "'utterance_id'"), rc=1),
    Case("convert_descriptions_not_a_list", "data.py",
         lambda d, fx: ["--convert-descriptions", ckpt_file(d, b'{"video_id": "dia0_utt0.mp4"}', "ann.json"),
                        str(d / "out.jsonl")],
         ("ann.json: a JSON dict; expected a list",), rc=1),
    # vision.py
    Case("vision_videos_missing", "vision.py", lambda d, fx: vision(d, "videos", str(d / "MELD.Raw")), "--videos",
         rc=1),
    Case("vision_endpoint_without_scheme", "vision.py", lambda d, fx: vision(d, "endpoint", "127.0.0.1:8080/v1"),
         "--endpoint"),
    Case("vision_out_is_a_folder", "vision.py", lambda d, fx: vision(d, "out", str(d / "videos")), "--out"),
    Case("vision_frames_zero", "vision.py", lambda d, fx: vision(d, "frames", "0"), "argument --frames"),
    Case("vision_unknown_split", "vision.py", lambda d, fx: vision(d, "split", "validation"), "argument --split"),
    Case("vision_without_model", "vision.py", lambda d, fx: vision(d, "model", None), "--model"),
]

# Valid inputs next to the bad ones: they must keep working (exit 0).
CONTROLS = [
    Case("train_dry_run_cuda_without_gpu", "train.py",
         lambda d, fx: train(fx, d, "--dry-run", "--device", "cuda", "--gpu-mem", "24"), "", rc=0),
    Case("eval_with_a_limit_beside_the_full_run", "eval.py", lambda d, fx: [run_of(fx, d), "--limit", "2"], "",
         rc=0),
]

# Cases also run as plain `python <script>` subprocesses, to show the launcher changes nothing.
PLAIN_CHECKS = ("eval_checkpoint_random_bytes",)


# ---------------------------------------------------------------- running them

def digest(tree: Path) -> dict[str, str]:
    """sha256 of every file under tree, by path relative to it."""
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file()}


def make_shared(tree: Path, shared_models: Path) -> Shared:
    """The tiny model, the synthetic MELD (24 utterances a split) and a train.py checkpoint of the model with a
    zero-initialised... adapter, as train.py saves it (ckpt.pt; ckpt_last.pt with optimizer state)."""
    import data
    import llama
    import lora
    import train
    model = tree / "model"
    make_checkpoint(model, shared_models)
    make_meld(tree / "data")
    base, _ = llama.load(model)
    lora.apply_lora(base, ["wq", "wv"], 2, 4.0, verbose=False)
    cfg = train.Config(model=str(model), out=str(tree / "run"), targets="wq,wv", r=2, lora_alpha=4.0, lr=1e-3,
                       warmup=0, epochs=1.0, batch_size=4, grad_accum=1, grad_ckpt="none", device="cpu",
                       dtype="float32")
    meta = dict(config=asdict(cfg), model_args=asdict(base.args), labels={"meld": data.LABELS["meld"]}, step=2,
                best=0.25, lora=lora.lora_state_dict(base))
    ckpt = tree / "ckpt.pt"
    torch.save(dict(meta, dev={}, label_bias=None), ckpt)
    ckpt_last = tree / "ckpt_last.pt"
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad])
    torch.save(dict(meta, optimizer=opt.state_dict()), ckpt_last)
    return Shared(model, tree / "data", ckpt.read_bytes(), ckpt_last.read_bytes())


def environment(tree: Path) -> dict[str, str]:
    """Every case's environment: the synthetic data, no GPU (so --device cuda is refused on any machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DIALOGUELLM_DEBUG", "DIALOGUELLM_VLM_KEY")}
    return dict(env, OMP_NUM_THREADS="1", DIALOGUELLM_DATA=str(tree / "data"), DIALOGUELLM_CACHE=str(tree / "cache"),
                CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")


def spec(case: Case, tree: Path, fx: Shared, env: dict) -> dict:
    """What the launcher needs to run a case, after building the case's files in tree/cases/<id>/."""
    folder = tree / "cases" / case.id
    folder.mkdir(parents=True)
    argv = [str(x) for x in case.build(folder, fx)]
    return dict(id=case.id, script=case.script, argv=argv, env=env, timeout=case.timeout)


def plain(case: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, case["script"], *case["argv"]], cwd=ROOT, env=case["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_plain(cases: list[dict], results: Path) -> None:
    """BAD_INPUT_PLAIN=1: every case as `python <script>`, JOBS at a time, results as the launcher writes them."""
    for start in range(0, len(cases), JOBS):
        batch = [(case, plain(case), time.time()) for case in cases[start:start + JOBS]]
        for case, proc, t0 in batch:
            out, err = proc.communicate(timeout=case["timeout"])
            (results / f"{case['id']}.out").write_text(out)
            (results / f"{case['id']}.err").write_text(err)
            status = {"rc": proc.returncode, "seconds": round(time.time() - t0, 2)}
            (results / f"{case['id']}.json").write_text(json.dumps(status))


@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def last(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def read_result(results: Path, name: str) -> Result:
    status = results / f"{name}.json"
    info = json.loads(status.read_text()) if status.exists() else {"rc": None, "seconds": 0.0}
    text = {}
    for kind in ("out", "err"):
        path = results / f"{name}.{kind}"
        text[kind] = path.read_text(errors="replace") if path.exists() else ""
    return Result(info["rc"], text["out"], text["err"], info["seconds"])


@dataclass
class Ran:
    results: dict[str, Result]  # by case id
    plain: dict[str, Result]  # PLAIN_CHECKS run as `python <script>`
    tree: Path  # every file the cases read; each case's own under cases/<id>/
    before: dict[str, str]  # sha256 of every file of the tree before the cases ran
    after: dict[str, str]

    def changed(self, prefix: str = "") -> list[str]:
        """Files under `prefix` (relative to the tree) that existed before and changed or vanished."""
        return [path for path, sha in self.before.items() if path.startswith(prefix) and self.after.get(path) != sha]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, shared_models) -> Ran:
    """Run every case (and PLAIN_CHECKS as plain subprocesses alongside). The launcher starts first, so that it
    imports torch while the cases' files are built; it waits for cases.json."""
    top = tmp_path_factory.mktemp("bad_input")
    tree = top / "tree"
    results = top / "results"
    results.mkdir()
    env = environment(tree)
    plain_mode = os.environ.get("BAD_INPUT_PLAIN") == "1" or not hasattr(os, "fork")
    launcher = None
    checks = {}
    if not plain_mode:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(top / "cases.json"), str(results), str(JOBS)],
                                    cwd=ROOT, env=env)
    try:
        fx = make_shared(tree, shared_models)
        specs = [spec(case, tree, fx, env) for case in CASES + CONTROLS]
        before = digest(tree)
        checks = {s["id"]: plain(s) for s in specs if s["id"] in PLAIN_CHECKS}
        t0 = time.time()
        if plain_mode:
            run_plain(specs, results)
        else:
            (top / "cases.tmp").write_text(json.dumps(specs))
            (top / "cases.tmp").rename(top / "cases.json")  # whole, or not there
            assert launcher.wait(timeout=600) == 0
        print(f"\n{len(specs)} cases done {time.time() - t0:.1f} s after their files were built")
        plain_results = {}
        for name, proc in checks.items():
            out, err = proc.communicate(timeout=120)
            plain_results[name] = Result(proc.returncode, out, err, 0.0)
    finally:
        for proc in [launcher, *checks.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
    found = {s["id"]: read_result(results, s["id"]) for s in specs}
    for name, r in found.items():  # the table of what each case prints (shown with pytest -s)
        print(f"{name:45} {r.seconds:5.2f} s  exit {r.rc}  {r.last[:150]}")
    return Ran(found, plain_results, tree, before, digest(tree))


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_gets_one_clear_line(ran, case):
    r = ran.results[case.id]
    shown = (f"{case.script} {case.id}: exit {r.rc} after {r.seconds} s\nstdout tail: {r.out[-800:]}\n"
             f"stderr tail: {r.err[-2500:]}")
    assert "Traceback" not in r.err, shown
    assert r.rc == case.rc, shown
    assert r.last.startswith(f"{case.script}: error: "), shown
    for text in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert text in r.last, shown
    for text in case.absent:
        assert text not in r.out + r.err, shown
    assert ran.changed(f"cases/{case.id}/") == [], shown


@pytest.mark.parametrize("case", CONTROLS, ids=lambda case: case.id)
def test_valid_input_next_to_bad_input_still_works(ran, case):
    r = ran.results[case.id]
    assert r.rc == 0, f"exit {r.rc}\nstdout: {r.out[-1500:]}\nstderr: {r.err[-2500:]}"
    assert ran.changed(f"cases/{case.id}/") == []


def test_dry_run_cuda_prints_the_plan(ran):
    r = ran.results["train_dry_run_cuda_without_gpu"]
    assert "memory plan" in r.out and "cuda" in r.out and "fits in 24" in r.out, r.out


def test_a_limited_evaluation_keeps_its_own_folder(ran):
    run = ran.tree / "cases/eval_with_a_limit_beside_the_full_run/run"
    assert (run / "eval-test-limit2/metrics.json").is_file()
    assert json.loads((run / "eval-test-limit2/metrics.json").read_text())["meld"]["n"] == 2
    for name, text in EARLIER.items():
        assert (run / name).read_text() == text


def test_no_earlier_file_changed(ran):
    assert ran.changed() == []


@pytest.mark.parametrize("name", PLAIN_CHECKS)
def test_launcher_matches_plain_python(ran, name):
    forked = ran.results[name]
    direct = ran.plain[name]
    assert (forked.rc, forked.last) == (direct.rc, direct.last), direct.err[-2000:]


def test_every_script_is_covered():
    assert {case.script for case in CASES} == {"train.py", "eval.py", "data.py", "vision.py"}
    assert len(CASES) == 82  # a case lost by an edit shows here
