"""Offline sample media with content known frame by frame, for tests, benchmarks and the demo.

Every video is a real H.264 mp4 written by the ``ffmpeg`` program from frames drawn here, so a test
can check decoded pixels against what was drawn:
- the frame index is written in the top-left corner as ``INDEX_BITS`` black/white blocks;
- the background is a textured pattern per *scene*, changing at given times (planted scene cuts);
- a red square (the *object*) is present only inside given time intervals, moving as time passes.
Everything is deterministic in ``seed``. Run as a script to write a sample set and a manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

INDEX_BITS = 16
BLOCK = 8  # pixels per index bit: survives H.264 at the quality used here
OBJECT_RGB = (230, 20, 20)


@dataclass(frozen=True)
class VideoSpec:
    """What a generated video contains, so tests can predict every frame."""

    seconds: float = 4.0
    fps: float = 10.0
    width: int = 192
    height: int = 144
    seed: int = 0
    object_intervals: tuple[tuple[float, float], ...] = ((1.0, 2.5),)
    scene_changes: tuple[float, ...] = ()
    gop: int = 10  # keyframe interval in frames

    def __post_init__(self) -> None:
        if self.width < INDEX_BITS * BLOCK or self.height < 4 * BLOCK:
            raise ValueError(
                f"video must be at least {INDEX_BITS * BLOCK}x{4 * BLOCK} to carry the frame index; "
                f"got {self.width}x{self.height}"
            )
        if self.width % 2 or self.height % 2:
            raise ValueError(f"H.264 4:2:0 needs even sizes; got {self.width}x{self.height}")
        if self.seconds <= 0 or self.fps <= 0:
            raise ValueError(f"seconds and fps must be positive; got {self.seconds}, {self.fps}")

    @property
    def num_frames(self) -> int:
        return round(self.seconds * self.fps)

    def timestamp(self, index: int) -> float:
        return index / self.fps

    def object_present(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.object_intervals)

    def scene_at(self, t: float) -> int:
        return sum(1 for cut in self.scene_changes if t >= cut)


@dataclass
class SampleSet:
    """Paths and specs of a generated set, serialisable as a manifest."""

    videos: dict[str, VideoSpec] = field(default_factory=dict)
    images: dict[str, tuple[int, int]] = field(default_factory=dict)

    def manifest(self) -> dict:
        return {
            "videos": {path: asdict(spec) for path, spec in self.videos.items()},
            "images": {path: {"width": w, "height": h} for path, (w, h) in self.images.items()},
        }


def _scene_texture(spec: VideoSpec, scene: int) -> np.ndarray:
    """A smooth random texture per scene, so patch similarity drops sharply at a cut."""
    rng = np.random.default_rng((spec.seed, scene))
    coarse = rng.integers(30, 200, size=(spec.height // 16 + 2, spec.width // 16 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((spec.width, spec.height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


def draw_index(frame: np.ndarray, index: int) -> None:
    """Write ``index`` into the frame's top-left corner, most significant bit first."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"frame index {index} does not fit in {INDEX_BITS} bits")
    for bit in range(INDEX_BITS):
        on = (index >> (INDEX_BITS - 1 - bit)) & 1
        frame[0:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255 if on else 0


def read_index(frame: np.ndarray) -> int:
    """Recover the index drawn by ``draw_index`` from an HWC or CHW uint8 frame."""
    arr = np.asarray(frame)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    value = 0
    for bit in range(INDEX_BITS):
        block = arr[2 : BLOCK - 2, bit * BLOCK + 2 : (bit + 1) * BLOCK - 2]
        value = (value << 1) | int(block.mean() > 127)
    return value


def object_visible(frame: np.ndarray, min_fraction: float = 0.01) -> bool:
    """Whether the red object is in an HWC or CHW uint8 frame."""
    arr = np.asarray(frame).astype(np.int16)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    red = (r > 180) & (g < 80) & (b < 80)
    return bool(red.mean() >= min_fraction)


def frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """The exact RGB frames (HWC uint8) that ``write_video`` encodes."""
    textures: dict[int, np.ndarray] = {}
    side = max(spec.height // 4, 8)
    for index in range(spec.num_frames):
        t = spec.timestamp(index)
        scene = spec.scene_at(t)
        if scene not in textures:
            textures[scene] = _scene_texture(spec, scene)
        frame = textures[scene].copy()
        if spec.object_present(t):
            span = spec.width - side - 1
            x = int((t * 37.0) % max(span - BLOCK, 1)) + 1
            y = spec.height // 2 - side // 2
            frame[y : y + side, x : x + side] = OBJECT_RGB
        draw_index(frame, index)
        yield frame


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise RuntimeError("the ffmpeg program is needed to write sample videos (run `make setup`)")
    return found


def write_video(path: str | Path, spec: VideoSpec) -> Path:
    """Encode ``frames(spec)`` as H.264 (yuv420p, near-lossless) into an mp4 at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        ffmpeg_binary(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{spec.width}x{spec.height}", "-r", f"{spec.fps}",
        "-i", "-",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "12", "-pix_fmt", "yuv420p",
        "-g", str(spec.gop), "-bf", "0", "-movflags", "+faststart", str(path),
    ]  # fmt: skip
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        try:
            for frame in frames(spec):
                proc.stdin.write(frame.tobytes())
        finally:
            proc.stdin.close()
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {err.strip()}")
    return path


def write_long_video(
    path: str | Path, *, seconds: float, fps: float = 30.0, width: int = 320, height: int = 240
) -> Path:
    """A long video (benchmarks): ffmpeg's own test pattern with a running frame counter.

    Drawing frames in Python would dominate the time for an hour of video, so this one is made by
    ffmpeg's ``testsrc2`` source; its content is not checked frame by frame.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        ffmpeg_binary(), "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(int(fps * 2)),
        str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An mp4 holding a sine tone and no video stream (for error tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi",
           "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


def write_corrupt(path: str | Path, seed: int = 0, size: int = 4096) -> Path:
    """Random bytes with an mp4 name (for error tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_image(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    """A textured RGB image of any size; the format follows the suffix (.png, .jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = VideoSpec(width=max(width + width % 2, INDEX_BITS * BLOCK), height=max(height + height % 2, 32),
                     seed=seed)  # fmt: skip
    texture = _scene_texture(spec, 0)[:height, :width]
    Image.fromarray(texture).save(path)
    return path


def write_sample_set(
    out_dir: str | Path, seed: int = 0, image_sizes: Sequence[tuple[int, int]] = ((333, 217), (97, 451))
) -> SampleSet:
    """A small set: a clip with the object and two scene cuts, a short clip, odd-sized images."""
    out = Path(out_dir)
    result = SampleSet()
    clips = {
        "object_scenes.mp4": VideoSpec(
            seconds=6.0, fps=10.0, seed=seed, object_intervals=((2.0, 3.5),), scene_changes=(2.0, 4.0)
        ),
        "short.mp4": VideoSpec(
            seconds=1.0, fps=8.0, width=160, height=96, seed=seed + 1, object_intervals=()
        ),
    }
    for name, spec in clips.items():
        result.videos[str(write_video(out / name, spec))] = spec
    for i, (w, h) in enumerate(image_sizes):
        suffix = ".png" if i % 2 == 0 else ".jpg"
        result.images[str(write_image(out / f"image_{w}x{h}{suffix}", w, h, seed=seed + i))] = (w, h)
    (out / "manifest.json").write_text(json.dumps(result.manifest(), indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/sample_media", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = write_sample_set(args.out, seed=args.seed)
    print(f"wrote {len(result.videos)} videos and {len(result.images)} images to {args.out}")


if __name__ == "__main__":
    main()
