"""vision.py: frame sampling on small real mp4 files made here with PyAV, and the captioner CLI against a local
chat-completions server on 127.0.0.1. All offline."""
import base64
import functools
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest

import cli
import data
import vision

ROOT = Path(__file__).resolve().parents[1]

KEY = "sk-test-SECRET-7731"
FPS, N_FRAMES = 10, 60  # 6 s clips; frame i has brightness 4 * i in its top 16 rows


def make_clip(path, n_frames=N_FRAMES, faststart=False):
    """64x48 clip at FPS with a keyframe every 10 frames; the bottom rows are noise so the file has real bulk."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt, s.bit_rate = 64, 48, "yuv420p", 4_000_000
        s.codec_context.gop_size = 10
        if codec == "libx264":
            s.options = {"x264-params": "scenecut=0", "crf": "8"}
        for i in range(n_frames):
            img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            img[:16] = 4 * i
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path


def index_of(frame):
    return int(round(frame[:16].mean() / 4))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "dia0_utt0.mp4")


def test_sample_frames_by_timestamp(clip):
    with av.open(str(clip)) as c:  # the clip must need seek + decode forward: keyframes only every 10 frames
        assert sum(p.is_keyframe for p in c.demux(video=0)) <= 6
    for n in (4, 7):
        times, frames = vision.sample_frames(clip, n)
        assert times.shape == (n,) and frames.shape == (n, 48, 64, 3) and frames.dtype == np.uint8
        assert np.all(np.diff(times) > 0)
        targets = (np.arange(n) + 0.5) * N_FRAMES / FPS / n
        assert np.all((times <= targets + 1e-6) & (times > targets - 1 / FPS))  # the frame on screen at the target
        assert [index_of(f) for f in frames] == [round(t * FPS) for t in times]


def test_cap(clip):
    times, frames = vision.sample_frames(clip, 4, max_seconds=2.0)
    assert np.allclose(times, [0.2, 0.7, 1.2, 1.7]) and [index_of(f) for f in frames] == [2, 7, 12, 17]


def test_short_clip_gives_each_frame_once(tmp_path):
    times, frames = vision.sample_frames(make_clip(tmp_path / "short.mp4", n_frames=3), 8)
    assert np.allclose(times, [0.0, 0.1, 0.2]) and [index_of(f) for f in frames] == [0, 1, 2]


def test_truncated_keeps_frames_before_the_damage(tmp_path):
    whole = make_clip(tmp_path / "whole.mp4", faststart=True).read_bytes()  # index first, so half a file opens
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[:len(whole) // 2])
    times, frames = vision.sample_frames(cut, 4)
    assert 1 <= len(times) < 4 and np.all(np.diff(times) > 0)
    assert [index_of(f) for f in frames] == [round(t * FPS) for t in times]
    whole = make_clip(tmp_path / "index_last.mp4").read_bytes()  # index at the end: nothing can be decoded
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(vision.VideoError, match="cut.mp4"):
        vision.sample_frames(cut, 4)


def test_empty_audio_only_and_absent_files_raise(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode())
    for path, reason in [(empty, "cannot open"), (audio, "no video stream"), (tmp_path / "absent.mp4", "cannot open")]:
        with pytest.raises(vision.VideoError, match=f"{path.name}: {reason}"):
            vision.sample_frames(path, 4)


# ------------------------------------------------------------------ a local chat-completions server

class Handler(BaseHTTPRequestHandler):
    """Answers each POST with the next step of server.plan (an int status, or "hold": no answer until the test
    ends), then with success.
    A prompt holding a text in server.refuse gets a 401 that echoes the Authorization header back."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        step = self.server.plan.pop(0) if self.server.plan else None
        prompt = body["messages"][0]["content"][0]["text"]
        if step == "hold":  # never answer in time: wait until the test ends (or a minute)
            self.server.release.wait(60)
        status = step if isinstance(step, int) else 401 if any(t in prompt for t in self.server.refuse) else 200
        reply = {"choices": [{"message": {"role": "assistant", "content": f"described: {prompt}"}}]}
        payload = json.dumps(reply if status == 200 else {"error": self.headers["Authorization"]}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # talk to 127.0.0.1 directly
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.requests, srv.plan, srv.refuse = True, [], [], set()
    srv.release = threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_port}/v1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_request_carries_images_prompt_model_and_key(server, clip):
    captioner = vision.Captioner(server.url, "test-vlm", KEY)
    assert KEY not in repr(captioner)
    _, frames = vision.sample_frames(clip, 3)
    assert "Rachel" in captioner.describe(frames, "Oh my God!", "Rachel")
    [(path, headers, body)] = server.requests
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "test-vlm"
    text, *images = body["messages"][0]["content"]
    assert "Oh my God!" in text["text"] and "Rachel" in text["text"] and "gaze" in text["text"]
    assert "only what is visible" in text["text"] and "do not name or guess an emotion" in text["text"]
    assert len(images) == 3
    for part in images:
        url = part["image_url"]["url"]
        assert part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
        jpeg = base64.b64decode(url.split(",", 1)[1])
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
        with av.open(io.BytesIO(jpeg), format="mjpeg") as c:
            assert next(c.decode(video=0)).to_ndarray(format="rgb24").shape == (48, 64, 3)


def test_retries_5xx_and_timeouts_not_4xx(server, clip):
    """Counts, not clocks: a request the server never answers is a timeout however busy the machine is, and the
    answered ones have 30 s (the timeout tests 1 s: a local answer slower than that would need a stalled host)."""
    frames = vision.sample_frames(clip, 1)[1]
    patient = dict(key=KEY, retries=2, backoff=0.01, timeout=30)
    server.plan = [500, 503]
    assert vision.Captioner(server.url, "m", **patient).describe(frames).startswith("described")
    assert len(server.requests) == 3
    server.plan = [500] * 3
    with pytest.raises(vision.CaptionError, match="HTTP 500.*after 3 tries"):
        vision.Captioner(server.url, "m", **patient).describe(frames)
    assert len(server.requests) == 6
    impatient = dict(patient, timeout=1.0)
    server.plan = ["hold"]
    assert vision.Captioner(server.url, "m", **impatient).describe(frames).startswith("described")
    assert len(server.requests) == 8
    server.plan = ["hold"] * 3
    with pytest.raises(vision.CaptionError, match="timeout.*after 3 tries"):
        vision.Captioner(server.url, "m", **impatient).describe(frames)
    assert len(server.requests) == 11
    server.requests.clear()
    server.refuse = {"FAIL"}
    with pytest.raises(vision.CaptionError, match="HTTP 401") as error:
        vision.Captioner(server.url, "m", **patient).describe(frames, "FAIL")
    assert len(server.requests) == 1 and KEY not in str(error.value)  # the 401 body echoes the key: not shown
    with pytest.raises(vision.CaptionError, match="connection.*after 3 tries"):
        vision.Captioner(closed_url(), "m", **patient).describe(frames)


def closed_url():
    """An endpoint on a port nobody listens on: every request is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ------------------------------------------------------------------ the CLI

DIALOGUES = [[{"dataset": "meld", "dialogue_id": d, "utterance_id": u, "speaker": "Joey", "text": f"line {d}-{u}",
               "label": "neutral"} for u in range(n)] for d, n in [(0, 3), (1, 2), (2, 1)]]


@pytest.fixture
def meld(tmp_path, monkeypatch):
    """MELD.Raw/train_splits with clips for 0-0, 0-1, 0-2 and 2-0, a corrupt 1-0, no 1-1, an extra 9-9."""
    videos = tmp_path / "MELD.Raw" / "train_splits"
    videos.mkdir(parents=True)
    for d, u in [(0, 0), (0, 1), (0, 2), (2, 0), (9, 9)]:
        make_clip(videos / f"dia{d}_utt{u}.mp4", n_frames=20)
    (videos / "dia1_utt0.mp4").write_bytes(b"not a video")
    monkeypatch.setattr(data, "load_split", lambda dataset, split, data_dir=None: DIALOGUES)
    monkeypatch.setenv("DIALOGUELLM_VLM_KEY", KEY)
    return tmp_path


def run(meld, url, capsys, *flags):
    """vision.main on the meld fixture -> (exit status, the counts of the summary line, all it printed)."""
    status = vision.main(["--videos", str(meld / "MELD.Raw"), "--split", "train", "--out", str(meld / "d.jsonl"),
                          "--endpoint", url, "--model", "test-vlm", *flags])
    printed = capsys.readouterr()
    summary = printed.out.splitlines()[-1]
    counts = {name: int(n) for name, n in re.findall(r"(described|already done|missing|failed) (\d+)", summary)}
    return status, counts, printed.out + printed.err


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_resumes_without_duplicates(meld, server, capsys):
    out = meld / "d.jsonl"
    server.refuse = {"line 0-2"}
    status, counts, printed = run(meld, server.url, capsys)
    server.refuse = set()
    assert status == 1 and (counts["described"], counts["missing"], counts["failed"]) == (3, 1, 2)
    assert "failed dia0_utt2.mp4: HTTP 401" in printed
    assert "dia1_utt0.mp4: cannot open or decode (InvalidDataError)" in printed
    assert {(r["dialogue_id"], r["utterance_id"]) for r in records(out)} == {(0, 0), (0, 1), (2, 0)}
    whole = out.read_bytes()
    out.write_bytes(whole[:-20])  # a run killed in the middle of its last line: the rerun cuts it and redoes it
    status, counts, printed = run(meld, server.url, capsys)
    assert (counts["already done"], counts["described"], counts["missing"]) == (2, 2, 1)
    status, counts, printed2 = run(meld, server.url, capsys)
    assert (counts["already done"], counts["described"]) == (4, 0)
    lines = records(out)
    assert sorted((r["dialogue_id"], r["utterance_id"]) for r in lines) == [(0, 0), (0, 1), (0, 2), (2, 0)]
    for r in lines:
        assert r["dataset"] == "meld" and r["split"] == "train"
        assert f'line {r["dialogue_id"]}-{r["utterance_id"]}' in r["description"]
    descriptions = data.load_descriptions(out)
    assert descriptions[("meld", "train", 0, 2)] == next(r["description"] for r in lines if r["utterance_id"] == 2)
    assert len(descriptions) == 4
    assert KEY not in printed + printed2


def test_cli_interrupted_resumes(meld, server, monkeypatch, capsys):
    calls, describe = [], vision.Captioner.describe

    def interrupt_third(self, frames, text="", speaker=""):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return describe(self, frames, text, speaker)

    monkeypatch.setattr(vision.Captioner, "describe", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run(meld, server.url, capsys)
    assert len(records(meld / "d.jsonl")) == 2  # every line finished before the interrupt is on disk
    assert "described 2" in capsys.readouterr().out  # the summary is printed on the way out
    monkeypatch.setattr(vision.Captioner, "describe", describe)
    status, counts, printed = run(meld, server.url, capsys)
    assert (counts["already done"], counts["described"]) == (2, 2)
    assert len(records(meld / "d.jsonl")) == len(data.load_descriptions(meld / "d.jsonl")) == 4
    assert KEY not in printed


def test_cli_refused_endpoint_stops_after_a_few_failures_in_a_row(meld, monkeypatch, capsys):
    monkeypatch.setattr(vision, "Captioner", functools.partial(vision.Captioner, retries=0))
    tries, urlopen = [], vision.urllib.request.urlopen
    monkeypatch.setattr(vision.urllib.request, "urlopen", lambda *a, **k: tries.append(1) or urlopen(*a, **k))
    with pytest.raises(cli.UserError, match=f"failed {vision.MAX_FAILURES_IN_A_ROW} times in a row.*connection"):
        run(meld, closed_url(), capsys)
    assert len(tries) == vision.MAX_FAILURES_IN_A_ROW  # one request per clip, no retry, then it stopped
    printed = capsys.readouterr()
    assert printed.err.count("failed dia") == vision.MAX_FAILURES_IN_A_ROW == 3
    assert "dia2_utt0" not in printed.err  # the clips after the third failure were not tried
    assert "described 0" in printed.out and KEY not in printed.out + printed.err


def test_cli_flags_checked_before_any_work(meld, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_split", lambda *args: pytest.fail("loaded data before checking the flags"))
    base = ["--videos", str(meld / "MELD.Raw"), "--split", "train", "--out", str(meld / "d.jsonl"), "--model", "m"]
    for endpoint in ["127.0.0.1:8080/v1", "localhost:8080/v1", "ftp://127.0.0.1/v1"]:
        with pytest.raises(cli.UsageError, match="--endpoint"):
            vision.main(base + ["--endpoint", endpoint])
    with pytest.raises(cli.UsageError, match="--out"):
        vision.main(base + ["--endpoint", "http://127.0.0.1:1/v1", "--out", str(meld)])
    with pytest.raises(cli.UsageError, match="--out"):
        vision.main(base + ["--endpoint", "http://127.0.0.1:1/v1", "--out", str(meld / "absent" / "d.jsonl")])
    with pytest.raises(SystemExit) as error:
        vision.main(base + ["--endpoint", "http://127.0.0.1:1/v1", "--frames", "0"])
    assert error.value.code == 2 and "--frames" in capsys.readouterr().err


def run_script(*flags, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGUELLM_VLM")} | env
    return subprocess.run([sys.executable, "vision.py", *flags], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_script_error_is_one_line(tmp_path):
    flags = ["--split", "train", "--out", str(tmp_path / "d.jsonl"), "--model", "m", "--endpoint", "http://127.0.0.1:1"]
    missing = run_script("--videos", str(tmp_path / "nowhere"), *flags)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines() == [f"vision.py: error: --videos {tmp_path / 'nowhere'}: no such folder"]
    assert not (tmp_path / "d.jsonl").exists()
