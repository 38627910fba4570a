"""Slow/fast frame selection of Keye-VL-1.5: a frame becomes a new *slow* frame when its patch similarity
to the last slow frame drops below 0.9; the others are *fast* frames (fewer tokens).

Similarity follows ``keye-vl-utils`` 1.5.2 step by step (its numbers are pinned in the tests): frames
resized (uint8 antialiased bilinear) to at most 256 tokens, converted to 8-bit HSV exactly as OpenCV
does (integer tables, reimplemented here so OpenCV is not needed), cut into 28 x 28 patches; a patch is
similar when the cosine of its HSV vectors exceeds 0.7; the score is the fraction of similar patches.
Streaming: only the last slow frame is kept, so memory does not grow with the number of frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .image import IMAGE_FACTOR, smart_resize

MIN_FRAME_SIMILARITY = 0.9
PATCH_SIMILARITY = 0.7
SIMILARITY_MIN_PIXELS = 48 * IMAGE_FACTOR**2
SIMILARITY_MAX_PIXELS = 256 * IMAGE_FACTOR**2

_HSV_SHIFT = 12
_I = torch.arange(256, dtype=torch.float64)
# OpenCV's RGB2HSV_b tables: round((255 << 12) / v) and round((180 << 12) / (6 * diff)); index 0 -> 0.
_SDIV = torch.where(_I > 0, torch.round((255 << _HSV_SHIFT) / _I.clamp(min=1)), 0).long()
_HDIV = torch.where(_I > 0, torch.round((180 << _HSV_SHIFT) / (6 * _I.clamp(min=1))), 0).long()


def rgb_to_hsv_u8(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` RGB -> uint8 HSV with H in [0, 180), bit-exact with cv2.COLOR_RGB2HSV."""
    if rgb.dtype != torch.uint8:
        raise ValueError(f"rgb_to_hsv_u8 expects uint8 frames; got {rgb.dtype}")
    r, g, b = (rgb.select(-3, i).long() for i in range(3))
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV.to(rgb.device)[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV.to(rgb.device)[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v], dim=-3).to(torch.uint8)


def similarity_size(height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, min_pixels=SIMILARITY_MIN_PIXELS, max_pixels=SIMILARITY_MAX_PIXELS)


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of 28 x 28 patches whose HSV cosine exceeds 0.7 (``a``, ``b``: HSV ``[3, H, W]``)."""
    p = IMAGE_FACTOR
    _, h, w = a.shape
    pa, pb = (x.float().reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(h // p, w // p, -1)
              for x in (a, b))  # fmt: skip
    na = torch.norm(pa, p=2, dim=-1, keepdim=True) + 1e-8
    nb = torch.norm(pb, p=2, dim=-1, keepdim=True) + 1e-8
    cos = ((pa / na) * (pb / nb)).sum(dim=-1)
    nonzero = ~((na.squeeze(-1) < 0.01) & (nb.squeeze(-1) < 0.01))
    # A float32 mean compared against the threshold as keye-vl-utils does (0.9 itself counts as below).
    return (cos[nonzero] > PATCH_SIMILARITY).float().mean().item()


class SlowFastTracker:
    """Feed frames in order (uint8 ``[N, 3, H, W]`` chunks); collects ``True`` for slow frames."""

    def __init__(self, threshold: float = MIN_FRAME_SIMILARITY) -> None:
        self.threshold = threshold
        self.is_slow: list[bool] = []
        self._key: torch.Tensor | None = None

    def update(self, frames: torch.Tensor) -> None:
        size = similarity_size(frames.shape[-2], frames.shape[-1])
        small = F.interpolate(frames, size=list(size), mode="bilinear", antialias=True)
        for hsv in rgb_to_hsv_u8(small):
            if self._key is None:
                slow = True
            else:
                score = frame_similarity(self._key, hsv)
                slow = score < self.threshold  # NaN (all-black patches) counts as similar
            if slow:
                self._key = hsv
            self.is_slow.append(slow)
