"""Writes keye_vl_utils_1_5_2.json: numbers computed by the reference ``keye-vl-utils==1.5.2``.

Not part of the test run (it needs the reference and OpenCV). How the JSON was made:
    pip download --no-deps keye-vl-utils==1.5.2; unzip it to $SRC
    python -m venv $VENV; $VENV/bin/pip install opencv-python-headless einops requests
    (torch from the Keye venv through a .pth file)
    cd packages/keye-vision/tests && PYTHONPATH=$SRC:.:../../../tools $VENV/bin/python golden/make_golden.py
The reference's own functions run unchanged; only its decoders are replaced: ``decord.VideoReader``
by a reader serving ``media.frame`` (the same synthetic frames the tests build), and ``torchvision``
(imported but unused on these paths) by an empty module.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

for name in ("torchvision", "torchvision.io", "torchvision.transforms"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["torchvision"].io = sys.modules["torchvision.io"]
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["torchvision.transforms"].InterpolationMode = object

import media  # noqa: E402


class _Batch:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def asnumpy(self) -> np.ndarray:
        return self.array


class FakeVideoReader:
    """decord.VideoReader over a JSON spec: {height, width, fps, seconds, cuts}."""

    def __init__(self, spec: str) -> None:
        self.spec = json.loads(spec)

    def __len__(self) -> int:
        return round(self.spec["seconds"] * self.spec["fps"])

    def get_avg_fps(self) -> float:
        return float(self.spec["fps"])

    def get_batch(self, indices: list[int]) -> _Batch:
        s = self.spec
        cuts = tuple(s["cuts"])
        return _Batch(np.stack([media.frame(s["height"], s["width"], i, s["fps"], cuts) for i in indices]))


sys.modules["decord"] = types.SimpleNamespace(VideoReader=FakeVideoReader)

from keye_vl_utils import vision_process as ref  # noqa: E402

SMART_RESIZE = [
    (h, w, mn, mx)
    for h, w in [(28, 28), (1, 100), (10, 10), (217, 333), (451, 97), (1080, 1920), (1920, 1080),
                 (4000, 3000), (7000, 9000), (50, 9000), (28, 5600), (333, 333), (14, 2800), (720, 1280),
                 (145, 193)]
    for mn, mx in [(ref.MIN_PIXELS, ref.MAX_PIXELS), (ref.VIDEO_MIN_PIXELS, ref.VIDEO_MAX_PIXELS),
                   (ref.VIDEO_MIN_PIXELS, 256 * 28 * 28), (56 * 56, 28 * 28 * 1280)]
]  # fmt: skip
NFRAMES = [
    (ele, total, fps)
    for ele in ({}, {"fps": 1.0}, {"fps": 4.0}, {"fps": 30.0}, {"max_frames": 64},
                {"min_pixels": 128 * 28 * 28}, {"video_total_pixels": 8192 * 28 * 28, "fps": 3.0})
    for total, fps in [(40, 10.0), (300, 29.97), (90000, 25.0), (7, 30.0), (1000, 24.0), (216000, 60.0)]
]  # fmt: skip
# name -> (frames spec, keye-vl-utils options); small total budgets keep the binding cases cheap to test.
VIDEOS = {
    "short": (dict(height=144, width=192, fps=10.0, seconds=6.0, cuts=[2.0, 4.0]), {}),
    "exact_size": (dict(height=168, width=224, fps=12.0, seconds=8.0, cuts=[2.0, 4.0]), {}),
    "portrait_large": (dict(height=1280, width=720, fps=5.0, seconds=20.0, cuts=[7.0]), {}),
    "budget_binds": (
        dict(height=336, width=448, fps=10.0, seconds=120.0, cuts=[2.0 * k for k in range(1, 60)]),
        {"video_total_pixels": 16384 * 28 * 28},
    ),
    "frame_cap": (
        dict(height=144, width=192, fps=25.0, seconds=3600.0, cuts=[60.0 * k for k in range(1, 60)]),
        {"video_total_pixels": 8192 * 28 * 28, "fps": 1.0},
    ),
}


def main() -> None:
    out: dict = {"source": "keye-vl-utils==1.5.2 (vision_process.py), run by make_golden.py"}
    rows = []
    for h, w, mn, mx in SMART_RESIZE:
        try:
            rows.append([h, w, mn, mx, list(ref.smart_resize(h, w, min_pixels=mn, max_pixels=mx))])
        except ValueError:
            rows.append([h, w, mn, mx, "ValueError"])
    out["smart_resize"] = rows
    out["smart_nframes"] = [
        [ele, total, fps, ref.smart_nframes(ele, total, fps)] for ele, total, fps in NFRAMES
    ]
    videos = {}
    for name, (spec, options) in VIDEOS.items():
        frames, kw = ref.fetch_video({"video": json.dumps(spec), **options})
        indices = [int(np.asarray(media.sample_media.read_index(f.numpy()))) for f in frames]
        videos[name] = {
            "spec": spec,
            "options": options,
            "indices": indices,
            "timestamps": [float(t) for t in kw["timestamps"].tolist()],
            "frame_types": [int(t) for t in kw["frame_types"].tolist()],
            "slow_size": [kw["height"], kw["width"]],
            "fast_size": [kw["fast_height"], kw["fast_width"]],
        }
        print(name, len(indices), sum(videos[name]["frame_types"]), videos[name]["slow_size"],
              videos[name]["fast_size"], flush=True)  # fmt: skip
    out["fetch_video"] = videos
    # Similarity of a grey-scene frame to a blue-scene frame sharing its first k patch rows (k of 5):
    # pins the OpenCV HSV conversion, the 0.7 patch rule and the float32 mean.
    grey = torch.from_numpy(media.frame(140, 196, 0, 1.0, (1.0,))).permute(2, 0, 1).contiguous()
    blue = torch.from_numpy(media.frame(140, 196, 1, 1.0, (1.0,))).permute(2, 0, 1).contiguous()
    pairs = []
    for k in range(6):
        mixed = blue.clone()
        mixed[:, : 28 * k] = grey[:, : 28 * k]
        pairs.append(ref.get_frame_sim(grey, mixed))
    out["frame_sim_grey_blue_rows"] = pairs
    Path(__file__).with_name("keye_vl_utils_1_5_2.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
