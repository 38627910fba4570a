"""Image side of the Keye-VL-1.5 preprocessing: ``smart_resize``, loading, normalisation, patches.

Constants and rules are those of the public ``keye-vl-utils`` 1.5.2 (no run-time dependency on it).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PATCH = 14
IMAGE_FACTOR = 28  # patch 14 x merge 2: one LLM token per 28 x 28 pixels
MIN_PIXELS = 4 * IMAGE_FACTOR**2
MAX_PIXELS = 20480 * IMAGE_FACTOR**2
MAX_RATIO = 200
IMAGE_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalisation
IMAGE_STD = (0.5, 0.5, 0.5)

ImageSource = str | Path | bytes | Image.Image | torch.Tensor | np.ndarray


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
) -> tuple[int, int]:
    """Size closest to ``(height, width)`` with both sides multiples of ``factor`` and the area inside
    ``[min_pixels, max_pixels]``, aspect ratio kept; ratios above 200 are refused."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive; got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"aspect ratio of a {height}x{width} image is {max(height, width) / min(height, width):.1f}; "
            f"at most {MAX_RATIO} is supported"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (torch.Tensor, np.ndarray)):
        arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if arr.dtype != np.uint8 or arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
            raise ValueError(
                f"an image tensor must be uint8 CHW or HWC with 3 channels; got {arr.dtype} {arr.shape}"
            )
        if arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), "image bytes")
    text = str(source)
    if text.startswith("data:image"):
        if "base64," not in text:
            raise ValueError("a data: image URL must be base64 encoded ('data:image/...;base64,...')")
        return _decode(io.BytesIO(base64.b64decode(text.split("base64,", 1)[1])), "data: image URL")
    if text.startswith(("http://", "https://")):
        raise ValueError(f"cannot load {text}: fetch remote images yourself and pass bytes (no network here)")
    path = Path(text[7:] if text.startswith("file://") else text)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return _decode(path, str(path))


def _decode(fp: io.BytesIO | Path, name: str) -> Image.Image:
    try:
        image = Image.open(fp)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode image {name}: {err}") from None
    return image


def load_image(
    source: ImageSource,
    *,
    min_pixels: float = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> torch.Tensor:
    """Load an image (path, ``file://``, ``data:`` URL, bytes, PIL, uint8 tensor/array) as RGB and resize
    it with PIL bicubic to ``smart_resize``'s size; returns a uint8 ``[3, H, W]`` tensor.

    ``resized_height``/``resized_width`` ask for a size (still rounded by ``smart_resize``)."""
    image = _open(source).convert("RGB")
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None and resized_width is not None:
        height, width = smart_resize(resized_height, resized_width)
    else:
        height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (image.width, image.height) != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def to_patches(
    images: Sequence[torch.Tensor] | torch.Tensor, patch_size: int = PATCH, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise uint8 ``[3, H, W]`` images or frames and cut them into KeyeViT's input.

    Returns ``pixel_values [total_patches, 3 * P * P]`` (float32, each patch in (C, P, P) order, patches
    row-major per image) and ``grid_thw [num_images, 3]`` with t = 1. H and W must be multiples of
    ``patch_size * merge_size`` so the projector can merge 2x2 neighbours."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.dim() == 4 else [images]
    factor = patch_size * merge_size
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    patches, grids = [], []
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"image {i} must be a uint8 [3, H, W] tensor; got {image.dtype} {tuple(image.shape)}"
            )
        _, h, w = image.shape
        if h % factor or w % factor:
            raise ValueError(
                f"image {i} is {h}x{w}; both sides must be multiples of {factor} (use smart_resize)"
            )
        x = (image.float() / 255.0 - mean.to(image.device)) / std.to(image.device)
        gh, gw = h // patch_size, w // patch_size
        x = x.reshape(3, gh, patch_size, gw, patch_size).permute(1, 3, 0, 2, 4)
        patches.append(x.reshape(gh * gw, 3 * patch_size * patch_size))
        grids.append((1, gh, gw))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)
