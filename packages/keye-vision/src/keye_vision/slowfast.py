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


def _hsv_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's RGB2HSV_b arithmetic, tabulated: S by (v, diff), H by (numerator + 255, diff).

    OpenCV: ``sdiv[v] = round((255 << 12) / v)``, ``hdiv[d] = round((180 << 12) / (6 d))`` (0 at 0),
    ``s = (diff * sdiv[v] + 2048) >> 12``, ``h = (num * hdiv[diff] + 2048) >> 12``, plus 180 when negative.
    """
    i = torch.arange(256, dtype=torch.float64)
    sdiv = torch.where(i > 0, torch.round((255 << _HSV_SHIFT) / i.clamp(min=1)), 0).long()
    hdiv = torch.where(i > 0, torch.round((180 << _HSV_SHIFT) / (6 * i.clamp(min=1))), 0).long()
    half = 1 << (_HSV_SHIFT - 1)
    diff = torch.arange(256)[None]
    s = (diff * sdiv[:, None] + half) >> _HSV_SHIFT  # [v, diff]
    num = torch.arange(-255, 5 * 255 + 1)[:, None]
    h = (num * hdiv[diff] + half) >> _HSV_SHIFT  # [num + 255, diff]
    h = torch.where(h < 0, h + 180, h)
    return h.clamp(0, 255).to(torch.uint8).reshape(-1), s.clamp(0, 255).to(torch.uint8).reshape(-1)


_H_TABLE, _S_TABLE = _hsv_tables()


def rgb_to_hsv_u8(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` RGB -> uint8 HSV with H in [0, 180), bit-exact with cv2.COLOR_RGB2HSV."""
    if rgb.dtype != torch.uint8:
        raise ValueError(f"rgb_to_hsv_u8 expects uint8 frames; got {rgb.dtype}")
    rgb = rgb.contiguous()  # planar: every op below then streams contiguous memory (~25 % faster)
    r, g, b = rgb.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    r16, g16, b16 = rgb.short().unbind(-3)
    d16 = diff.short()
    # OpenCV's hue numerator: by which channel holds the maximum (red first, then green).
    num = torch.where(v == r, g16 - b16, torch.where(v == g, b16 - r16 + 2 * d16, r16 - g16 + 4 * d16))
    # Table rows: (numerator + 255) * 256 + diff and v * 256 + diff; index_select is the fast gather.
    h = _H_TABLE.index_select(0, ((num.int() + 255) * 256 + diff).flatten()).view_as(v)
    s = _S_TABLE.index_select(0, (v.int() * 256 + diff).flatten()).view_as(v)
    return torch.stack([h, s, v], dim=-3)


def similarity_size(height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, min_pixels=SIMILARITY_MIN_PIXELS, max_pixels=SIMILARITY_MAX_PIXELS)


def _patch_vectors(hsv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV ``[..., 3, H, W]`` -> unit patch vectors ``[..., h, w, 3 * 28 * 28]`` and their norms."""
    p = IMAGE_FACTOR
    *lead, _, h, w = hsv.shape
    x = hsv.reshape(*lead, 3, h // p, p, w // p, p)  # patch order moved in uint8: a quarter of the bytes
    x = x.movedim(-5, -3).movedim(-3, -2).reshape(*lead, h // p, w // p, 3 * p * p).float()
    norm = torch.norm(x, p=2, dim=-1, keepdim=True) + 1e-8
    return x.div_(norm), norm.squeeze(-1)


def _similarities(
    key: tuple[torch.Tensor, torch.Tensor], frames: tuple[torch.Tensor, torch.Tensor]
) -> list[float]:
    """Fraction of 28 x 28 patches whose HSV cosine exceeds 0.7, for each frame against ``key``.

    Patches black in both frames are left out; keye-vl-utils takes a float32 mean and compares it
    with the threshold, so 0.9 itself counts as below (NaN, all patches left out, as similar)."""
    (kv, kn), (fv, fn) = key, frames
    cos = (kv * fv).sum(dim=-1)
    keep = ~((kn < 0.01) & (fn < 0.01))
    similar = ((cos > PATCH_SIMILARITY) & keep).flatten(1).sum(-1).float()
    return (similar / keep.flatten(1).sum(-1).float()).tolist()


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Patch similarity of two HSV ``[3, H, W]`` frames (see ``_similarities``)."""
    va, na = _patch_vectors(a)
    vb, nb = _patch_vectors(b[None])
    return _similarities((va, na), (vb, nb))[0]


class SlowFastTracker:
    """Feed frames in order (uint8 ``[N, 3, H, W]`` chunks); collects ``True`` for slow frames.

    Each pass scores all remaining frames of a chunk against the current slow frame at once and
    jumps to the first one below the threshold (the window grows while none is), so a chunk costs a
    few batched passes per slow frame."""

    def __init__(self, threshold: float = MIN_FRAME_SIMILARITY) -> None:
        self.threshold = threshold
        self.is_slow: list[bool] = []
        self._key: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, frames: torch.Tensor) -> None:
        size = similarity_size(frames.shape[-2], frames.shape[-1])
        small = F.interpolate(frames, size=list(size), mode="bilinear", antialias=True)
        vectors, norms = _patch_vectors(rgb_to_hsv_u8(small))
        i = 0
        if self._key is None:
            self._key, i = (vectors[0], norms[0]), 1
            self.is_slow.append(True)
        window = 4
        while i < len(vectors):
            scores = _similarities(self._key, (vectors[i : i + window], norms[i : i + window]))
            below = [j for j, s in enumerate(scores) if s < self.threshold]
            step = below[0] if below else len(scores)
            self.is_slow.extend([False] * step)
            if below:
                self._key = (vectors[i + step], norms[i + step])
                self.is_slow.append(True)
                window = 4
            else:
                window *= 2  # a calm stretch: look further ahead per pass
            i += step + (1 if below else 0)
