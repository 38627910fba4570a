"""A synthetic temporal-grounding task for `make demo`: when does the red square appear?

Each clip is drawn by the sample-media generator at 2 fps for 3 s, so the processor samples exactly
six frames at 0.0, 0.5, ..., 2.5 s and announces each by its timestamp. The red square is present
on frames ``k .. m - 1`` (``0 <= k < m <= 5``); the answer is ``"from a to b"`` with ``a = k / 2`` (the
first frame showing it) and ``b = m / 2`` (the first frame after it), both timestamps the model sees.
(Six frames of at least 48 tokens each, Keye-VL-1.5's minimum, keep a sample near 350 tokens: what a
tiny model can learn on two CPU cores in a few minutes.)
Scoring is temporal IoU against ``[a, b)``; the chance baseline draws a uniformly random valid interval.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import sample_media

SECONDS = 3.0
FPS = 2.0  # the source frame rate equals the sampling rate: frame i is at i / FPS seconds
WIDTH, HEIGHT = 128, 96
NUM_FRAMES = round(SECONDS * FPS)
QUESTION = "When does the red square appear? Answer with start and end times in seconds."
CAPTION_QUESTION = "At which timestamps is the red square visible?"
_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*(?:to|-)\s*(\d+(?:\.\d+)?)")

# every interval the task can ask about, as (first frame, first frame after)
INTERVALS = [(k, m) for k, m in itertools.combinations(range(NUM_FRAMES), 2)]


@dataclass(frozen=True)
class Clip:
    video: str
    start: float  # seconds, first frame with the square
    end: float  # seconds, first frame after it

    @property
    def visible(self) -> list[float]:
        return [i / FPS for i in range(NUM_FRAMES) if self.start <= i / FPS < self.end]


def answer(clip: Clip) -> str:
    return f"from {clip.start:.1f} to {clip.end:.1f}"


def caption(clip: Clip) -> str:
    return " ".join(f"{t:.1f}" for t in clip.visible)


def make_clips(folder: str | Path, count: int, seed: int) -> list[Clip]:
    """``count`` clips with random intervals, scenes and textures, written as H.264 mp4 files."""
    rng = random.Random(seed)
    folder = Path(folder)
    clips = []
    for n in range(count):
        k, m = rng.choice(INTERVALS)
        cut = (rng.randrange(1, NUM_FRAMES) / FPS,) if rng.random() < 0.3 else ()
        spec = sample_media.VideoSpec(
            seconds=SECONDS, fps=FPS, width=WIDTH, height=HEIGHT, seed=seed * 100_000 + n,
            object_intervals=((k / FPS, m / FPS),), scene_changes=cut, gop=4,
        )  # fmt: skip
        path = sample_media.write_video(folder / f"clip_{seed}_{n:04d}.mp4", spec)
        clips.append(Clip(str(path.resolve()), k / FPS, m / FPS))
    return clips


def video_part(clip: Clip) -> dict:
    return {"type": "video", "video": clip.video, "fps": FPS}


def grounding_record(clip: Clip) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [video_part(clip), {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": answer(clip)},
        ]
    }


def caption_record(clip: Clip) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [video_part(clip), {"type": "text", "text": CAPTION_QUESTION}]},
            {"role": "assistant", "content": caption(clip)},
        ]
    }


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def parse_interval(text: str) -> tuple[float, float] | None:
    """The first ``a to b`` in a reply, or None when there is none."""
    found = _INTERVAL.search(text)
    if not found:
        return None
    a, b = float(found.group(1)), float(found.group(2))
    return (a, b) if b > a else None


def iou(pred: tuple[float, float] | None, truth: tuple[float, float]) -> float:
    if pred is None:
        return 0.0
    inter = max(0.0, min(pred[1], truth[1]) - max(pred[0], truth[0]))
    union = max(pred[1], truth[1]) - min(pred[0], truth[0])
    return inter / union if union > 0 else 0.0


def score(preds: list[tuple[float, float] | None], truths: list[tuple[float, float]]) -> dict[str, float]:
    ious = [iou(p, t) for p, t in zip(preds, truths, strict=True)]
    return {"mIoU": sum(ious) / len(ious), "R@0.5": sum(i >= 0.5 for i in ious) / len(ious)}


def chance(truths: list[tuple[float, float]]) -> dict[str, float]:
    """Exact expectation for a guesser drawing one of the task's intervals uniformly at random."""
    candidates = [(k / FPS, m / FPS) for k, m in INTERVALS]
    per = [[iou(c, t) for c in candidates] for t in truths]
    return {
        "mIoU": sum(sum(row) / len(row) for row in per) / len(per),
        "R@0.5": sum(sum(v >= 0.5 for v in row) / len(row) for row in per) / len(per),
    }


def prior(train: list[tuple[float, float]], truths: list[tuple[float, float]]) -> dict[str, float]:
    """A blind guesser that always answers the training set's single best interval."""
    candidates = [(k / FPS, m / FPS) for k, m in INTERVALS]
    best = max(candidates, key=lambda c: sum(iou(c, t) for t in train))
    return score([best] * len(truths), truths)


def long_record(clips: list[Clip]) -> dict:
    """Several clips in one sample (stage 3's long context): ground the square in the last one."""
    parts = [video_part(c) for c in clips]
    question = f"There are {len(clips)} videos. In the last one, {QUESTION[0].lower()}{QUESTION[1:]}"
    return {
        "messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer(clips[-1])},
        ]
    }


def write_dataset(folder: str | Path, *, train: int, val: int, test: int, seed: int = 0) -> dict[str, Path]:
    """Clips plus the JSONL files every tiny stage config reads (``outputs/demo/data`` by default)."""
    folder = Path(folder)
    splits = {
        "train": make_clips(folder / "videos", train, seed),
        "val": make_clips(folder / "videos", val, seed + 1),
        "test": make_clips(folder / "videos", test, seed + 2),
    }
    tr = splits["train"]
    files = {
        "captions_train": write_jsonl(folder / "captions_train.jsonl", [caption_record(c) for c in tr]),
        "grounding_train": write_jsonl(folder / "grounding_train.jsonl", [grounding_record(c) for c in tr]),
        "grounding_val": write_jsonl(
            folder / "grounding_val.jsonl", [grounding_record(c) for c in splits["val"]]
        ),
        "grounding_test": write_jsonl(
            folder / "grounding_test.jsonl", [grounding_record(c) for c in splits["test"]]
        ),
        "long_train": write_jsonl(
            folder / "long_train.jsonl", [long_record([tr[i - 2], tr[i - 1], tr[i]]) for i in range(len(tr))]
        ),
    }
    (folder / "clips.json").write_text(
        json.dumps({k: [c.__dict__ for c in v] for k, v in splits.items()}, indent=1)
    )
    return files
