"""Visual knowledge for DialogueLLM: describe each MELD clip with a vision-language chat model.

DialogueLLM (Zhang et al., arXiv 2310.11374) adds to each instruction a text description of the utterance's
video clip, written by a multimodal chat model prompted with expert instructions. This script samples a few
frames of each clip with PyAV, sends them as JPEG images to an OpenAI-compatible chat-completions endpoint
and appends one JSON line per utterance to the descriptions file that data.load_descriptions reads:

    python vision.py --videos MELD.Raw/train_splits --split train --out descriptions.jsonl \\
        --endpoint http://127.0.0.1:8080/v1 --model NAME

A rerun skips the utterances already in the file, so an interrupted run resumes where it stopped.
"""
import argparse
import base64
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

import data

MAX_SECONDS = 60.0  # MELD clips last seconds; a few mis-cut ones run for minutes: look at the first minute
SPLIT_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
PROMPT = ("You are an expert in nonverbal behaviour. The {n} images are frames, in time order, from a TV-series "
          'clip in which {speaker} says: "{text}". In two or three sentences, describe {speaker}\'s facial '
          "expression, gaze, gestures and posture, and the scene. Describe only what is visible; do not name "
          "or guess an emotion.")


class VideoError(Exception):
    """A clip that cannot be read: empty, without a video stream, truncated or corrupt."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


class CaptionError(Exception):
    """The chat endpoint gave no description (after the retries that make sense)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _out_size(width: int, height: int, size) -> tuple[int, int]:
    """(W, H) for size None (unchanged), an int short side (aspect kept, even sides) or a (W, H) pair."""
    if size is None:
        return width, height
    if isinstance(size, int):
        scale = size / min(width, height)
        return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
    return tuple(size)


def sample_frames(path, n: int, size=None, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """Decode n frames evenly spaced in time: the frames on screen at the middles of n equal slices of the clip.

    Each target time is reached by seeking to the keyframe before it and decoding forward (a bare seek would
    return the keyframe). Only the first max_seconds of a longer clip are considered. size: None keeps the
    frame size, an int is the short side (aspect kept, sides rounded to even), a pair is (W, H).
    Returns (times, frames): times float64 (k,) seconds from the start of the video stream, strictly
    increasing; frames uint8 RGB (k, H, W, 3). k < n when the clip has fewer distinct frames than n (one frame
    is never returned twice), or when it is damaged: frames decoded before the damage are kept.
    Raises VideoError (naming the file) for an empty, audio-only, truncated or corrupt file with no frame.
    """
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(path, f"cannot open ({type(e).__name__})") from e
    with container:
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        if container.duration is None:
            raise VideoError(path, "unknown duration")
        span = min(container.duration / av.time_base, max_seconds)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        times, frames = [], []
        try:
            for i in range(n):
                target = start + (i + 0.5) * span / n
                container.seek(int(target / stream.time_base), stream=stream)  # lands on the keyframe before
                picked = None
                for frame in container.decode(stream):  # the last frame at or before the target
                    if picked is not None and frame.time > target + 1e-6:
                        break
                    picked = frame
                if picked is None or (times and picked.time - start <= times[-1]):
                    continue  # a short clip: this frame was already taken
                width, height = _out_size(picked.width, picked.height, size)
                times.append(picked.time - start)
                frames.append(picked.reformat(width=width, height=height, format="rgb24").to_ndarray())
        except av.FFmpegError as e:
            if not frames:
                raise VideoError(path, f"damaged ({type(e).__name__})") from e
        if not frames:
            raise VideoError(path, "no frame decoded")
        return np.array(times, dtype=np.float64), np.stack(frames)


def to_jpeg(rgb: np.ndarray) -> bytes:
    """One uint8 RGB frame (H, W, 3) -> JPEG bytes, encoded by FFmpeg's mjpeg codec through PyAV."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.height, codec.width = rgb.shape[:2]
    codec.pix_fmt, codec.time_base = "yuvj420p", Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(packet) for packet in codec.encode(frame) + codec.encode(None))


@dataclass
class Captioner:
    """Client of an OpenAI-compatible chat-completions endpoint serving a vision-language model.

    url is the API base (e.g. http://127.0.0.1:8080/v1); requests go to {url}/chat/completions with the key as a
    Bearer token. The key stays out of repr and error messages. Timeouts, connection errors and 5xx answers are
    retried `retries` times, sleeping backoff * 2**attempt seconds; 4xx answers are not retried.
    """
    url: str
    model: str
    key: str = field(default="", repr=False)
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 2.0
    max_tokens: int = 256

    def describe(self, frames: np.ndarray, text: str = "", speaker: str = "") -> str:
        """frames uint8 RGB (N, H, W, 3) of one clip, its utterance and speaker -> description. Raises CaptionError.

        The expert prompt asks for visible behaviour only (DialogueLLM's visual knowledge, arXiv 2310.11374); no
        emotion word, so the description cannot simply hand the label to the ERC model.
        """
        images = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                      + base64.b64encode(to_jpeg(f)).decode()}} for f in frames]
        prompt = PROMPT.format(n=len(frames), speaker=speaker or "the speaker", text=text)
        reply = self._post({"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}, *images]}]})
        try:
            description = reply["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise CaptionError("bad response", self._redact(json.dumps(reply)[:200])) from None
        if not description:
            raise CaptionError("empty description")
        return description

    def _redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.key}"} if self.key else {})
        request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                error = CaptionError(f"HTTP {e.code}", self._redact(e.read(300).decode(errors="replace")))
                if e.code < 500:
                    raise error from None
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are all OSError
                cause = getattr(e, "reason", e)
                error = CaptionError("timeout" if isinstance(cause, TimeoutError) else "connection", str(cause))
            except ValueError:
                raise CaptionError("bad response", "not JSON") from None
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise CaptionError(error.reason, f"{error.detail} (after {self.retries + 1} tries)")


def load_done(path: Path) -> set[tuple]:
    """Keys (dataset, split, dialogue_id, utterance_id) already in a descriptions file.

    A truncated last line (a run killed while writing) is cut off the file; a bad line elsewhere raises ValueError.
    """
    if not path.exists():
        return set()
    done, offset, lines = set(), 0, path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                record = json.loads(line)
                done.add((record["dataset"], record["split"], record["dialogue_id"], record["utterance_id"]))
        except (ValueError, KeyError, TypeError) as e:
            if number < len(lines):  # a complete line, not the unfinished tail
                raise ValueError(f"{path} line {number}: not a description record ({e})") from None
            print(f"{path}: removed a truncated last line ({len(line)} bytes) of an interrupted run", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(offset)
            return done
        offset += len(line) + 1
    if lines[-1]:  # a complete record without its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return done


def main(argv=None) -> tuple[Counter, Counter]:
    p = argparse.ArgumentParser(description="Describe MELD clips with a vision-language model (see module doc).")
    p.add_argument("--videos", required=True, help="folder of dia{D}_utt{U}.mp4 files, or MELD.Raw holding "
                   + ", ".join(SPLIT_DIRS.values()))
    p.add_argument("--data", default="meld", choices=["meld"])
    p.add_argument("--split", required=True, choices=list(SPLIT_DIRS))
    p.add_argument("--data-dir", default=None, help="folder of the MELD CSVs (see data.resolve_data_dir)")
    p.add_argument("--out", required=True, help="descriptions JSONL, appended to")
    p.add_argument("--endpoint", default=os.environ.get("DIALOGUELLM_VLM_URL"), help="API base URL; $DIALOGUELLM_VLM_URL")
    p.add_argument("--model", default=os.environ.get("DIALOGUELLM_VLM_MODEL"), help="$DIALOGUELLM_VLM_MODEL")
    p.add_argument("--key", default=os.environ.get("DIALOGUELLM_VLM_KEY", ""), help="prefer $DIALOGUELLM_VLM_KEY")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=448, help="short side of the frames sent, in pixels")
    p.add_argument("--workers", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=Captioner.timeout, help="seconds per request")
    p.add_argument("--limit", type=int, default=None, help="only the first N utterances of the split")
    args = p.parse_args(argv)
    if not args.endpoint or not args.model:
        p.error("--endpoint and --model (or $DIALOGUELLM_VLM_URL and $DIALOGUELLM_VLM_MODEL) are required")
    captioner = Captioner(args.endpoint, args.model, args.key, timeout=args.timeout)
    videos, out = Path(args.videos), Path(args.out)
    if (videos / SPLIT_DIRS[args.split]).is_dir():
        videos = videos / SPLIT_DIRS[args.split]
    utterances = [u for dialogue in data.load_split(args.data, args.split, args.data_dir) for u in dialogue]
    done, failed, todo = load_done(out), Counter(), []
    counts = Counter(dict.fromkeys(["described", "with fewer frames (short or damaged clip)", "skipped (already done)",
                                    "missing"], 0))
    for u in utterances[:args.limit]:
        clip = videos / f"dia{u['dialogue_id']}_utt{u['utterance_id']}.mp4"
        if (args.data, args.split, u["dialogue_id"], u["utterance_id"]) in done:
            counts["skipped (already done)"] += 1
        elif not clip.is_file():
            counts["missing"] += 1
        else:
            todo.append((u, clip))

    def describe(u, clip):
        times, frames = sample_frames(clip, args.frames, args.size)
        return len(times), captioner.describe(frames, u["text"], u["speaker"])

    pool = ThreadPoolExecutor(args.workers)
    jobs = {pool.submit(describe, u, clip): (u, clip) for u, clip in todo}
    try:
        with open(out, "a", encoding="utf-8") as f:  # only this thread writes, one whole line at a time
            for job in tqdm(as_completed(jobs), total=len(jobs), desc=f"describe {args.split}"):
                u, clip = jobs[job]
                try:
                    n_frames, description = job.result()
                except (VideoError, CaptionError) as e:
                    failed[f"{type(e).__name__}: {e.reason}"] += 1
                    tqdm.write(f"failed: {e}" if isinstance(e, VideoError) else f"failed {clip}: {e}", sys.stderr)
                    continue
                f.write(json.dumps({"dataset": args.data, "split": args.split, "dialogue_id": u["dialogue_id"],
                                    "utterance_id": u["utterance_id"], "description": description}) + "\n")
                f.flush()
                counts["described"] += 1
                counts["with fewer frames (short or damaged clip)"] += n_frames < args.frames
    finally:  # on Ctrl-C too: queued clips are dropped, every finished line is already on disk
        pool.shutdown(wait=False, cancel_futures=True)
        summary = ", ".join(f"{name} {count}" for name, count in counts.items())
        print(f"{out}: {summary}, failed {failed.total()}" + (f" {dict(failed)}" if failed else ""))
    return counts, failed


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
