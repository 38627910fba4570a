"""Image preprocessing: smart_resize pinned to keye-vl-utils 1.5.2, loading from every source, patches."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import sample_media
import torch
import torch.nn.functional as F
from PIL import Image

from keye_vision import load_image, smart_resize, to_patches

# Computed by running keye-vl-utils==1.5.2 itself (tests/golden/make_golden.py says how).
GOLDEN = json.loads((Path(__file__).parent / "golden" / "keye_vl_utils_1_5_2.json").read_text())


def test_smart_resize_matches_keye_vl_utils():
    assert len(GOLDEN["smart_resize"]) == 60
    for h, w, lo, hi, want in GOLDEN["smart_resize"]:
        if want == "ValueError":
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        else:
            assert list(smart_resize(h, w, min_pixels=lo, max_pixels=hi)) == want, (h, w, lo, hi)


def test_smart_resize_rejects_empty_sizes():
    with pytest.raises(ValueError, match="image size must be positive; got height=0"):
        smart_resize(0, 10)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    return sample_media.write_image(tmp_path_factory.mktemp("img") / "a.png", 333, 217)


def test_load_image_from_every_source_agrees(image_file):
    want = load_image(image_file)
    assert want.dtype == torch.uint8 and tuple(want.shape) == (3, *smart_resize(217, 333))
    data = image_file.read_bytes()
    pil = Image.open(image_file)
    arr = np.array(pil.convert("RGB"))
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [str(image_file), f"file://{image_file}", data, pil, arr, chw, url]
    for source in sources:
        assert torch.equal(load_image(source), want), type(source)


def test_load_image_resizes_like_pil_bicubic(image_file):
    got = load_image(image_file, max_pixels=56 * 84)
    h, w = smart_resize(217, 333, max_pixels=56 * 84)
    pil = Image.open(image_file).convert("RGB").resize((w, h), Image.BICUBIC)
    assert torch.equal(got, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    assert tuple(load_image(image_file, resized_height=100, resized_width=60).shape) == (3, 112, 56)


def test_load_image_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot decode image .*bad.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="uint8 CHW or HWC with 3 channels"):
        load_image(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="aspect ratio"):
        load_image(np.zeros((2, 500, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="both resized_height and resized_width"):
        load_image(np.zeros((30, 30, 3), dtype=np.uint8), resized_height=28)
    with pytest.raises(ValueError, match="fetch remote images yourself"):
        load_image("https://example.com/a.png")


def test_to_patches_is_the_conv_layout():
    """A Conv2d(patch=stride=14) on the normalised image equals a matmul on to_patches' rows."""
    torch.manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8),
        torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8),
    ]
    pixels, grid = to_patches(images)
    assert grid.tolist() == [[1, 4, 6], [1, 2, 2]] and pixels.shape == (28, 588)
    conv = torch.nn.Conv2d(3, 5, 14, 14)
    rows = []
    for img in images:
        x = (img.float() / 255 - 0.5) / 0.5
        rows.append(conv(x[None])[0].flatten(1).T)  # row-major over the patch grid
    torch.testing.assert_close(F.linear(pixels, conv.weight.flatten(1), conv.bias), torch.cat(rows))
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_to_patches_needs_multiples_of_28():
    with pytest.raises(ValueError, match="image 0 is 30x28; both sides must be multiples of 28"):
        to_patches([torch.zeros(3, 30, 28, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"image 0 must be a uint8 \[3, H, W\]"):
        to_patches([torch.zeros(3, 28, 28)])
