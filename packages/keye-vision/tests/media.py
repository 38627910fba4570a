"""Test videos whose scene cuts the Keye-VL-1.5 similarity can see.

``sample_media``'s scenes differ only in texture; HSV patch cosines stay above 0.7 across such cuts, so
Keye's slow/fast rule (rightly) ignores them. Here scenes alternate between grey and saturated blue
textures (cosine ~0.5), and every frame still carries ``sample_media``'s index code.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import sample_media
from PIL import Image


@lru_cache(maxsize=8)
def _scene(height: int, width: int, scene: int) -> np.ndarray:
    rng = np.random.default_rng(scene)
    value = rng.integers(80, 230, size=(height // 16 + 2, width // 16 + 2), dtype=np.uint8)
    value = np.asarray(Image.fromarray(value).resize((width, height), Image.BILINEAR))
    hue = np.full_like(value, 170)  # PIL hue 170/255 = blue
    sat = np.full_like(value, 0 if scene % 2 == 0 else 255)
    return np.asarray(Image.merge("HSV", [Image.fromarray(c) for c in (hue, sat, value)]).convert("RGB"))


def scene_of(t: float, cuts: tuple[float, ...]) -> int:
    return sum(1 for c in cuts if t >= c)


def frame(height: int, width: int, index: int, fps: float, cuts: tuple[float, ...]) -> np.ndarray:
    """HWC uint8 frame ``index``: the scene texture at ``index / fps`` with the index (mod 2^16) drawn in."""
    out = _scene(height, width, scene_of(index / fps, cuts)).copy()
    sample_media.draw_index(out, index % 2**sample_media.INDEX_BITS)
    return out


def write_scene_video(
    path: str | Path, *, seconds: float, fps: float, width: int, height: int, cuts: tuple[float, ...]
) -> Path:
    """Encode ``frame(...)`` for every index as near-lossless H.264, keyframe every second."""
    path = Path(path)
    cmd = [
        sample_media.ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "-", "-c:v", "libx264", "-preset", "veryfast",
        "-crf", "12", "-pix_fmt", "yuv420p", "-g", str(int(fps)), "-bf", "0", str(path),
    ]  # fmt: skip
    with subprocess.Popen(cmd, stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        for i in range(round(seconds * fps)):
            proc.stdin.write(frame(height, width, i, fps, cuts).tobytes())
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}")
    return path
