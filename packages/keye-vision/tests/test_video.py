"""Video preprocessing: every number pinned to keye-vl-utils 1.5.2, frame-accurate decoding, errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import media
import numpy as np
import pytest
import sample_media
import torch
import torch.nn.functional as F

from keye_vision import decode_chunks, frame_sizes, load_video, sample_count, sample_indices
from keye_vision.slowfast import SlowFastTracker, frame_similarity, rgb_to_hsv_u8
from keye_vision.video import VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS

# Computed by running keye-vl-utils==1.5.2 itself on the same synthetic frames (golden/make_golden.py).
GOLDEN = json.loads((Path(__file__).parent / "golden" / "keye_vl_utils_1_5_2.json").read_text())
VIDEOS = GOLDEN["fetch_video"]


def test_frame_counts_match_keye_vl_utils():
    assert len(GOLDEN["smart_nframes"]) == 42
    for ele, total, fps, want in GOLDEN["smart_nframes"]:
        got = sample_count(
            total, fps, ele.get("fps", 2.0), min_pixels=ele.get("min_pixels", VIDEO_MIN_PIXELS),
            total_pixels=ele.get("video_total_pixels", VIDEO_TOTAL_PIXELS), max_frames=ele.get("max_frames"),
        )  # fmt: skip
        assert got == want, (ele, total, fps)


def test_hsv_similarity_matches_keye_vl_utils():
    grey = torch.from_numpy(media.frame(140, 196, 0, 1.0, (1.0,))).permute(2, 0, 1)
    blue = torch.from_numpy(media.frame(140, 196, 1, 1.0, (1.0,))).permute(2, 0, 1)
    for k, want in enumerate(GOLDEN["frame_sim_grey_blue_rows"]):
        mixed = blue.clone()
        mixed[:, : 28 * k] = grey[:, : 28 * k]
        assert frame_similarity(rgb_to_hsv_u8(grey), rgb_to_hsv_u8(mixed)) == want


def _plan(spec: dict, options: dict) -> dict:
    """Our sampling, slow/fast split and sizes on the synthetic frames the reference saw."""
    budget = {"total_pixels": options.get("video_total_pixels", VIDEO_TOTAL_PIXELS)}
    total = round(spec["seconds"] * spec["fps"])
    indices = sample_indices(total, sample_count(total, spec["fps"], options.get("fps", 2.0), **budget))
    tracker = SlowFastTracker()
    cuts = tuple(spec["cuts"])
    for start in range(0, len(indices), 64):
        chunk = indices[start : start + 64]
        hwc = np.stack([media.frame(spec["height"], spec["width"], i, spec["fps"], cuts) for i in chunk])
        tracker.update(torch.from_numpy(hwc).permute(0, 3, 1, 2))  # channels-last, as decoders give it
    slow = sum(tracker.is_slow)
    sizes = frame_sizes(spec["height"], spec["width"], slow, len(indices) - slow, **budget)
    return {"indices": indices, "types": [0 if s else 1 for s in tracker.is_slow], "sizes": sizes}


@pytest.mark.parametrize("name", ["short", "exact_size", "portrait_large", "budget_binds", "frame_cap"])
def test_video_plan_matches_keye_vl_utils(name):
    want = VIDEOS[name]
    got = _plan(want["spec"], want["options"])
    assert [i % 2**16 for i in got["indices"]] == want["indices"]
    assert got["types"] == want["frame_types"]
    assert [list(s) for s in got["sizes"]] == [want["slow_size"], want["fast_size"]]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video")
    out = {
        n: media.write_scene_video(root / f"{n}.mp4", **VIDEOS[n]["spec"]) for n in ("short", "exact_size")
    }
    spec = sample_media.VideoSpec(
        seconds=6.0, fps=10.0, object_intervals=((2.0, 3.5),), scene_changes=(2.0, 4.0)
    )
    out["object"] = sample_media.write_video(root / "object.mp4", spec)
    out["audio"] = sample_media.write_audio_only(root / "audio.mp4")
    out["corrupt"] = sample_media.write_corrupt(root / "corrupt.mp4")
    (root / "empty.mp4").touch()
    out["empty"] = root / "empty.mp4"
    return out


def _read_index(frame: torch.Tensor, height: int, width: int) -> int:
    """The index code of a resized frame, read after scaling it back to the source size."""
    up = F.interpolate(frame[None].float(), size=(height, width), mode="bilinear")[0]
    return sample_media.read_index(up.round().clamp(0, 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("name", ["short", "exact_size"])
def test_load_video_matches_keye_vl_utils_end_to_end(videos, name):
    want = VIDEOS[name]
    spec = want["spec"]
    sample = load_video(videos[name])
    assert sample.indices == want["indices"]
    assert [_read_index(f, spec["height"], spec["width"]) for f in sample.frames] == want["indices"]
    assert sample.timestamps == want["timestamps"]
    assert sample.frame_types == ["fast" if t else "slow" for t in want["frame_types"]]
    assert [list(sample.slow_size), list(sample.fast_size)] == [want["slow_size"], want["fast_size"]]
    for frame, kind in zip(sample.frames, sample.frame_types):
        size = sample.slow_size if kind == "slow" else sample.fast_size
        assert frame.dtype == torch.uint8 and tuple(frame.shape[1:]) == size
    pixels, grid = sample.to_patches()
    assert grid.tolist() == [[1, f.shape[1] // 14, f.shape[2] // 14] for f in sample.frames]
    assert pixels.shape[0] == int(grid.prod(-1).sum()) and sum(sample.tokens_per_frame) * 4 == pixels.shape[0]


def test_slow_frames_start_at_the_planted_cuts(videos):
    sample = load_video(videos["short"])
    slow_times = [t for t, k in zip(sample.timestamps, sample.frame_types) if k == "slow"]
    cuts = [0.0, *VIDEOS["short"]["spec"]["cuts"]]
    # the first sampled frame at or after each cut, and only those, are slow
    assert slow_times == [min(t for t in sample.timestamps if t >= c - 1e-6) for c in cuts]


def test_sampled_frames_are_the_requested_ones(videos):
    spec = sample_media.VideoSpec(
        seconds=6.0, fps=10.0, object_intervals=((2.0, 3.5),), scene_changes=(2.0, 4.0)
    )
    for mode in ("exact", "approximate"):
        sample = load_video(videos["object"], fps=4.0, seek_mode=mode)
        assert len(sample.indices) == 24 and sample.indices[0] == 0 and sample.indices[-1] == 59
        assert [_read_index(f, 144, 192) for f in sample.frames] == sample.indices
        assert sample.timestamps == pytest.approx([spec.timestamp(i) for i in sample.indices])
        seen = [sample_media.object_visible(f.numpy()) for f in sample.frames]
        assert seen == [spec.object_present(t) for t in sample.timestamps]


@pytest.mark.parametrize("workers", [1, 3])
def test_decode_chunks_returns_the_requested_frames_in_order(videos, workers):
    """Several decoding threads, each seeking its own decoder, still hand back each index's frame."""
    wanted = [59, 0, 7, 8, 30, 31, 45, 2, 58]
    chunks = list(decode_chunks(videos["object"], wanted, workers=workers, chunk=2, seek_mode="exact"))
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 1]
    frames = torch.cat(chunks)
    assert frames.dtype == torch.uint8 and frames.shape[1:] == (3, 144, 192)
    assert [sample_media.read_index(f.permute(1, 2, 0).numpy()) for f in frames] == wanted
    threaded = load_video(videos["short"], decode_workers=workers)
    assert threaded.frame_types == load_video(videos["short"]).frame_types


def test_budget_options_shrink_frames(videos):
    small = load_video(videos["object"], fps=10.0, max_frames=5, max_pixels=48 * 28 * 28)
    assert len(small.frames) == 5 and small.video_fps == 10.0 and small.total_frames == 60
    assert max(small.tokens_per_frame) <= 48


def test_errors_name_the_file(videos, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video file not found: .*missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match=r"empty.mp4 is empty \(0 bytes\)"):
        load_video(videos["empty"])
    with pytest.raises(ValueError, match=r"cannot decode video .*corrupt.mp4"):
        load_video(videos["corrupt"])
    with pytest.raises(ValueError, match=r"audio.mp4 has no video stream \(it holds audio only\)"):
        load_video(videos["audio"])
    with pytest.raises(ValueError, match=r"too short .* to sample one frame at 0.1 fps"):
        load_video(videos["short"], fps=0.1)
    with pytest.raises(ValueError, match="fps must be positive"):
        load_video(videos["short"], fps=0)
    with pytest.raises(ValueError, match="seek_mode must be"):
        load_video(videos["short"], seek_mode="fast")
    with pytest.raises(ValueError, match="workers and chunk must be at least 1; got workers=0"):
        load_video(videos["short"], decode_workers=0)


def test_hsv_is_opencv_exact():
    """Pinned cv2.cvtColor(RGB2HSV) outputs (OpenCV 5.0; the conversion was also checked equal on all
    2^24 colours when written)."""
    pairs = {(0, 0, 0): (0, 0, 0), (255, 255, 255): (0, 0, 255), (255, 0, 0): (0, 255, 255),
             (0, 255, 0): (60, 255, 255), (0, 0, 255): (120, 255, 255), (12, 200, 77): (70, 240, 200),
             (200, 12, 77): (170, 240, 200), (77, 12, 200): (130, 240, 200), (128, 128, 129): (120, 2, 129),
             (1, 0, 0): (0, 255, 1), (250, 251, 252): (105, 2, 252), (90, 30, 30): (0, 170, 90),
             (30, 90, 30): (60, 170, 90), (30, 30, 90): (120, 170, 90), (255, 254, 0): (30, 255, 255),
             (3, 7, 5): (75, 146, 7)}  # fmt: skip
    colours, want = list(pairs), list(pairs.values())
    rgb = torch.tensor(colours, dtype=torch.uint8).T[:, None, :]  # [3, 1, N]
    assert [tuple(p) for p in rgb_to_hsv_u8(rgb)[:, 0].T.tolist()] == want


def test_hsv_matches_opencv_on_a_colour_grid():
    cv2 = pytest.importorskip("cv2")
    axis = torch.arange(0, 256, 3, dtype=torch.uint8)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, 1, -1)
    ref = cv2.cvtColor(grid.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2HSV)
    assert np.array_equal(rgb_to_hsv_u8(grid).permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize(
    ("name", "size", "codec"),
    [("odd.webm", "321x241", ["-c:v", "libvpx-vp9", "-deadline", "realtime"]),
     ("strip.mp4", "1280x20", ["-c:v", "libx264"])],
)  # fmt: skip
def test_other_codecs_odd_sizes_and_one_patch_row(tmp_path, name, size, codec):
    """VP9 at an odd size, and a strip whose similarity grid is a single row of patches (where
    keye-vl-utils itself fails on a squeeze): both sample, split and resize."""
    path = tmp_path / name
    source = f"testsrc2=size={size}:rate=24:duration=3"
    cmd = [sample_media.ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", source, *codec,
           "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    width, height = map(int, size.split("x"))
    sample = load_video(path)
    assert len(sample.frames) == 6 and sample.frame_types[0] == "slow" and sample.total_frames == 72
    slow = sample.frame_types.count("slow")
    assert sample.slow_size == frame_sizes(height, width, slow, 6 - slow)[0]
    pixels, grid = sample.to_patches()
    assert pixels.shape[0] == int(grid.prod(-1).sum())
