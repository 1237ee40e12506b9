"""Visual knowledge for DialogueLLM (Zhang et al. 2023, arXiv 2310.11374): a vision-language chat
model describes what is visible in a few PyAV frames of each MELD clip (JPEGs sent to an
OpenAI-compatible endpoint), never an emotion (that would hand over the label), one JSON line per
utterance for data.load_descriptions:
    python vision.py --videos MELD.Raw --split train --out d.jsonl \\
        --endpoint http://127.0.0.1:8080/v1 --model M"""
import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import av
import numpy as np
from tqdm import tqdm

import cli
import data

MAX_FAILURES_IN_A_ROW = 3  # then the endpoint is at fault, not a clip: stop
SPLIT_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
PROMPT = ("You are an expert in nonverbal behaviour. The {n} images are frames, in time order, from a TV-series clip "
          'in which {speaker} says: "{text}". In two or three sentences, describe {speaker}\'s facial expression, '
          "gaze, gestures and posture, and the scene. Describe only what is visible; do not name or guess an emotion.")

class VideoError(Exception):
    """A clip that cannot be read (empty, no video, truncated, corrupt); the message names it."""

class CaptionError(Exception):
    """The endpoint gave no description (after retries); the message never holds the key."""

def sample_frames(path, n: int, max_seconds: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Frames at the middles of n equal slices of the clip's first max_seconds (some MELD clips run
    for minutes) -> times float64 (k,), seconds from the stream start, increasing; frames uint8 RGB
    (k, H, W, 3); k < n for a short or damaged clip (no frame twice). VideoError."""
    times, frames = [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video or container.duration is None:
                raise VideoError(f"{path}: no video stream (or no duration)")
            stream = container.streams.video[0]
            span = min(container.duration / av.time_base, max_seconds)
            start = float((stream.start_time or 0) * stream.time_base)
            for i in range(n):
                target = start + (i + 0.5) * span / n
                container.seek(int(target / stream.time_base), stream=stream)  # keyframe before
                picked = None
                for frame in container.decode(stream):  # forward to the last frame <= target
                    if picked is not None and frame.time > target + 1e-6:
                        break
                    picked = frame
                if picked is not None and (not times or picked.time - start > times[-1]):
                    times.append(picked.time - start)
                    frames.append(picked.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:  # the frames decoded before the damage are kept
        if not frames:
            raise VideoError(f"{path}: cannot open or decode ({type(e).__name__})") from e
    if not frames:
        raise VideoError(f"{path}: no frame decoded")
    return np.array(times, dtype=np.float64), np.stack(frames)

def jpeg_url(rgb: np.ndarray) -> str:
    """One uint8 RGB frame (H, W, 3) -> a data: URL of its JPEG, encoded by FFmpeg's mjpeg codec."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.height, codec.width = rgb.shape[:2]
    codec.pix_fmt = "yuvj420p"  # the encoder converts the RGB frame to it
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")) + codec.encode(None)
    return "data:image/jpeg;base64," + base64.b64encode(b"".join(map(bytes, packets))).decode()

@dataclass
class Captioner:
    """Client of an OpenAI-compatible endpoint, the key a Bearer token never shown. Timeouts, refused
    connections and 5xx are retried `retries` times after backoff, 2 * backoff, ... s; a 4xx is not."""
    url: str
    model: str
    key: str = field(default="", repr=False)
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 2.0

    def describe(self, frames: np.ndarray, text: str = "", speaker: str = "") -> str:
        """frames uint8 RGB (N, H, W, 3) of a clip, its utterance and speaker -> description."""
        content = [{"type": "text", "text": PROMPT.format(n=len(frames), speaker=speaker or "the speaker", text=text)}]
        content += [{"type": "image_url", "image_url": {"url": jpeg_url(frame)}} for frame in frames]
        body = {"model": self.model, "max_tokens": 256, "temperature": 0.0,
                "messages": [{"role": "user", "content": content}]}
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    description = json.loads(response.read())["choices"][0]["message"]["content"].strip()
                if not description:
                    raise CaptionError("an empty description")
                return description
            except urllib.error.HTTPError as e:  # an OSError; its body may echo the key: not shown
                reason = f"HTTP {e.code} {e.reason}"
                if e.code < 500:
                    raise CaptionError(reason) from None
            except OSError as e:  # refused, unreachable, reset, timed out (URLError wraps these)
                reason = "timeout" if isinstance(getattr(e, "reason", e), TimeoutError) else f"connection: {e}"
            except (ValueError, LookupError, TypeError, AttributeError):
                raise CaptionError("a reply without a description (not chat-completions JSON)") from None
        raise CaptionError(f"{reason} (after {self.retries + 1} tries)")

def describe_split(args: argparse.Namespace) -> dict[str, int]:
    """Append each clip's description to args.out; print, return counts; UserError on failure."""
    split_dir = args.videos / SPLIT_DIRS[args.split]  # when --videos is MELD.Raw itself
    videos = split_dir if split_dir.is_dir() else args.videos
    cli.drop_torn_line(args.out)  # a killed run's unfinished last line
    done = set(data.load_descriptions(args.out)) if args.out.exists() else set()
    utterances = [u for dialogue in data.load_split("meld", args.split, args.data_dir) for u in dialogue]
    captioner = Captioner(args.endpoint, args.model, os.environ.get("DIALOGUELLM_VLM_KEY", ""))
    counts = dict.fromkeys(["described", "already done", "missing", "failed"], 0)
    in_a_row = 0  # endpoint failures since its last description; a bad clip is not one
    try:
        with open(args.out, "a", encoding="utf-8") as f:
            for u in tqdm(utterances, desc=f"describe {args.split}"):
                ids = ("meld", args.split, u["dialogue_id"], u["utterance_id"])
                clip = videos / f"dia{u['dialogue_id']}_utt{u['utterance_id']}.mp4"
                if ids in done or not clip.is_file():
                    counts["already done" if ids in done else "missing"] += 1
                    continue
                try:
                    description = captioner.describe(sample_frames(clip, args.frames)[1], u["text"], u["speaker"])
                except (VideoError, CaptionError) as e:
                    counts["failed"] += 1
                    tqdm.write(f"failed {clip.name}: {e}", sys.stderr)
                    if isinstance(e, CaptionError):
                        in_a_row += 1
                    if in_a_row == MAX_FAILURES_IN_A_ROW:
                        raise cli.UserError(f"--endpoint {args.endpoint}: failed {in_a_row} times in a row; last: {e}")
                    continue
                in_a_row = 0
                record = dict(zip(["dataset", "split", "dialogue_id", "utterance_id"], ids), description=description)
                print(json.dumps(record), file=f, flush=True)  # on disk for a rerun to skip
                counts["described"] += 1
    finally:  # on Ctrl-C and a failing endpoint too
        print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (clips in {videos})")
    return counts

def main(argv=None) -> int:
    """Exit status 1 when a clip failed (a rerun retries it); flags checked first (cli.vision_args)."""
    args = cli.vision_args(argv, __doc__, list(SPLIT_DIRS))
    return 1 if describe_split(args)["failed"] else 0

if __name__ == "__main__":
    cli.run(main)
