"""Video side of the Keye-VL-1.5 preprocessing, decoded with torchcodec.

Sampling, frame counts, slow/fast split and token budgets follow ``keye-vl-utils`` 1.5.2:
``n = min(floor(total_frames / video_fps * min(fps, video_fps)), total_pixels // min_pixels)`` frames
at indices ``round(linspace(0, total_frames - 1, n))``, timestamps ``index / video_fps``; the per-frame
budget of slow frames is the binary search of ``slow_tokens`` below, fast frames get 0.3 of it.

Only the sampled frames are decoded (``get_frames_at``, in chunks, by background threads that decode
ahead while the caller scores and resizes), slow/fast is decided while streaming, and frames larger
than any budget could use are shrunk on arrival: memory is proportional to the frames kept, never to
the video's length.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .image import IMAGE_FACTOR, PATCH, smart_resize, to_patches
from .slowfast import MIN_FRAME_SIMILARITY, SlowFastTracker

FPS = 2.0
VIDEO_MIN_PIXELS = 48 * IMAGE_FACTOR**2
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR**2
VIDEO_TOTAL_PIXELS = 65536 * IMAGE_FACTOR**2
FAST_TOKEN_RATIO = 0.3
LONG_VIDEO_SECONDS = 300.0  # longer files are opened in approximate seek mode (no full index scan)
CHUNK = 32  # frames decoded per call


@dataclass
class VideoSample:
    """A decoded, sampled, resized video, ready for :func:`to_patches` and the processor."""

    path: str
    frames: list[torch.Tensor]  # uint8 [3, h, w]; slow frames at slow_size, fast at fast_size
    timestamps: list[float]  # seconds
    frame_types: list[str]  # "slow" | "fast"
    indices: list[int]  # source frame indices
    slow_size: tuple[int, int]
    fast_size: tuple[int, int]
    video_fps: float
    total_frames: int

    @property
    def grid_thw(self) -> torch.Tensor:
        """``[num_frames, 3]``: every frame is its own item (t = 1) for the ViT."""
        return torch.tensor(
            [(1, f.shape[-2] // PATCH, f.shape[-1] // PATCH) for f in self.frames], dtype=torch.long
        )

    @property
    def tokens_per_frame(self) -> list[int]:
        """LLM tokens per frame after the 2x2 merge."""
        return [f.shape[-2] * f.shape[-1] // IMAGE_FACTOR**2 for f in self.frames]

    def to_patches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_patches(self.frames)


def sample_count(
    total_frames: int,
    video_fps: float,
    fps: float = FPS,
    *,
    min_pixels: float = VIDEO_MIN_PIXELS,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    max_frames: int | None = None,
) -> int:
    """Frames sampled at ``fps``, capped so every frame can still get ``min_pixels``."""
    if fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}")
    cap = int(total_pixels / min_pixels)
    if max_frames is not None:
        cap = min(max_frames, cap)
    return min(int(total_frames / video_fps * min(fps, video_fps)), cap)


def sample_indices(total_frames: int, count: int) -> list[int]:
    """Evenly spread indices (float32 linspace, round half to even, as the reference)."""
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def slow_tokens(
    num_slow: int,
    num_fast: int,
    *,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> float:
    """Token budget per slow frame: the binary search of keye-vl-utils (it returns the first budget
    whose total exceeds ``total_pixels``, or ``max_pixels``' tokens; kept as is to match its sizes)."""
    min_tokens = int(min_pixels / IMAGE_FACTOR**2)
    left, right = min_pixels / IMAGE_FACTOR**2, max_pixels / IMAGE_FACTOR**2

    def total(tokens: int) -> float:
        fast = max(int(FAST_TOKEN_RATIO * tokens), min_tokens)
        return (num_slow * tokens + num_fast * fast) * IMAGE_FACTOR**2

    while left < right:
        mid = int(left + right) // 2
        if total(mid) > total_pixels:
            right = mid
        else:
            left = mid + 1
    return left


def frame_sizes(
    height: int, width: int, num_slow: int, num_fast: int, *, min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS, total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> tuple[tuple[int, int], tuple[int, int]]:  # fmt: skip
    """(slow (h, w), fast (h, w)) for a ``height x width`` video with this slow/fast split."""
    min_pixels = max(int(min_pixels), VIDEO_MIN_PIXELS)
    budget = slow_tokens(num_slow, num_fast, min_pixels=min_pixels, max_pixels=max_pixels,
                         total_pixels=total_pixels) * IMAGE_FACTOR**2  # fmt: skip
    slow = smart_resize(height, width, min_pixels=min_pixels, max_pixels=budget)
    slow_count = slow[0] * slow[1] / IMAGE_FACTOR**2
    fast_max = max(int(slow_count * FAST_TOKEN_RATIO) * IMAGE_FACTOR**2, VIDEO_MIN_PIXELS)
    return slow, smart_resize(height, width, min_pixels=min_pixels, max_pixels=fast_max)


def _resize(frames: list[torch.Tensor], size: tuple[int, int], batch: int = 64) -> list[torch.Tensor]:
    """uint8 antialiased bicubic (PIL's fixed-point path) in batches; contiguous ``[3, h, w]`` out."""
    out: list[torch.Tensor] = []
    for start in range(0, len(frames), batch):
        group = frames[start : start + batch]
        if all(tuple(f.shape[-2:]) == tuple(size) for f in group):
            out.extend(f.contiguous() for f in group)
            continue
        stacked = torch.stack(group).contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(stacked, size=list(size), mode="bicubic", antialias=True, align_corners=False)
        out.extend(resized.contiguous().unbind(0))
    return out


def _open(path: Path, num_threads: int, seek_mode: str):
    from torchcodec.decoders import VideoDecoder

    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"video file {path} is empty (0 bytes)")
    try:
        return VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=num_threads, seek_mode=seek_mode)
    except (RuntimeError, ValueError) as err:
        if _has_audio(path):
            raise ValueError(f"{path} has no video stream (it holds audio only)") from None
        raise ValueError(f"cannot decode video {path}: {str(err).strip().splitlines()[-1]}") from None


def _has_audio(path: Path) -> bool:
    try:
        from torchcodec.decoders import AudioDecoder

        AudioDecoder(path)
    except Exception:  # any failure means "no usable audio stream" here
        return False
    return True


def decode_chunks(
    path: str | Path,
    indices: Sequence[int],
    *,
    workers: int = 1,
    seek_mode: str = "approximate",
    num_threads: int = 1,
    chunk: int = CHUNK,
    decoder=None,
) -> Iterator[torch.Tensor]:
    """The frames at ``indices`` as uint8 ``[n, 3, h, w]`` chunks of ``chunk`` frames, in order.

    ``workers`` threads decode ahead of the caller, each with its own torchcodec decoder (decoding
    releases the GIL), so decoding overlaps the caller's work and, with 2+ workers, other decoding;
    at most ``workers + 1`` chunks are in flight, so memory does not grow with the video. ``decoder``:
    an open decoder for ``path`` (in ``seek_mode``) that the first worker reuses."""
    if workers < 1 or chunk < 1:
        raise ValueError(f"workers and chunk must be at least 1; got workers={workers}, chunk={chunk}")
    parts = [list(indices[start : start + chunk]) for start in range(0, len(indices), chunk)]
    return _decode_ahead(Path(path), parts, workers, seek_mode, num_threads, decoder)


def _decode_ahead(path: Path, parts: list[list[int]], workers: int, seek_mode: str, num_threads: int,
                  decoder) -> Iterator[torch.Tensor]:  # fmt: skip
    spare = [decoder] if decoder is not None else []
    local, lock = threading.local(), threading.Lock()

    def decode(part: list[int]) -> torch.Tensor:
        if not hasattr(local, "decoder"):
            with lock:
                local.decoder = spare.pop() if spare else None
            if local.decoder is None:
                local.decoder = _open(path, num_threads, seek_mode)
        try:
            return local.decoder.get_frames_at(part).data.permute(0, 3, 1, 2)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"decoding frames {part[0]}..{part[-1]} of {path} failed: {err}") from None

    with ThreadPoolExecutor(workers, thread_name_prefix="keye-decode") as pool:
        pending: deque = deque()
        try:
            for part in parts:
                pending.append(pool.submit(decode, part))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the caller stopped early or failed: drop what was not started yet
            for future in pending:
                future.cancel()


def load_video(
    path: str | Path,
    *,
    fps: float = FPS,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    max_frames: int | None = None,
    min_frame_similarity: float = MIN_FRAME_SIMILARITY,
    seek_mode: str = "auto",
    num_threads: int = 1,
    decode_workers: int = 1,
) -> VideoSample:
    """Sample ``path`` at ``fps`` within the token budget, split slow/fast frames, resize each.

    ``seek_mode`` "auto" scans short files for an exact frame index and opens files longer than
    5 minutes in torchcodec's approximate mode; ``num_threads`` 0 lets FFmpeg choose (1, the
    default, measured fastest on a busy 2-core machine); ``decode_workers`` threads decode ahead
    (see :func:`decode_chunks`) while this thread scores and resizes."""
    path = Path(path)
    if seek_mode not in ("auto", "exact", "approximate"):
        raise ValueError(f"seek_mode must be 'auto', 'exact' or 'approximate'; got {seek_mode!r}")
    mode = "approximate" if seek_mode == "auto" else seek_mode
    decoder = _open(path, num_threads, mode)
    meta = decoder.metadata
    # Short files, and containers whose header lacks a frame count, get an exact index scan.
    if seek_mode == "auto" and ((meta.duration_seconds or 0.0) <= LONG_VIDEO_SECONDS or not meta.num_frames):
        mode = "exact"
        decoder = _open(path, num_threads, mode)
        meta = decoder.metadata
    total_frames = meta.num_frames or 0
    video_fps = meta.average_fps_from_header or meta.average_fps or 0.0
    if total_frames <= 0 or video_fps <= 0:
        raise ValueError(f"video {path} reports {total_frames} frames at {video_fps} fps; nothing to sample")
    height, width = meta.height, meta.width
    count = sample_count(total_frames, video_fps, fps, min_pixels=min_pixels, total_pixels=total_pixels,
                         max_frames=max_frames)  # fmt: skip
    if count <= 0:
        raise ValueError(f"video {path} is too short ({total_frames} frames at {video_fps:g} fps) to sample "
                         f"one frame at {fps:g} fps")  # fmt: skip
    indices = sample_indices(total_frames, count)
    # No frame can end up larger than the slow size when a single frame is slow: keep at most that.
    ceiling = frame_sizes(height, width, 1, count - 1, min_pixels=min_pixels, max_pixels=max_pixels,
                          total_pixels=total_pixels)[0]  # fmt: skip
    shrink = ceiling[0] * ceiling[1] < height * width
    tracker = SlowFastTracker(min_frame_similarity)
    kept: list[torch.Tensor] = []
    chunks = decode_chunks(path, indices, workers=decode_workers, seek_mode=mode, num_threads=num_threads,
                           decoder=decoder)  # fmt: skip
    del decoder  # the decoding thread owns it now
    with closing(chunks):  # on an error, stop the decoding threads now
        for batch in chunks:
            tracker.update(batch)
            kept.extend(_resize(list(batch), ceiling) if shrink else batch.unbind(0))
            del batch
    num_slow = sum(tracker.is_slow)
    slow_size, fast_size = frame_sizes(height, width, num_slow, count - num_slow, min_pixels=min_pixels,
                                       max_pixels=max_pixels, total_pixels=total_pixels)  # fmt: skip
    for kind, size in ((True, slow_size), (False, fast_size)):  # in place: never two copies alive
        where = [i for i, slow in enumerate(tracker.is_slow) if slow == kind]
        for start in range(0, len(where), 64):
            part = where[start : start + 64]
            for i, frame in zip(part, _resize([kept[i] for i in part], size)):
                kept[i] = frame
    return VideoSample(
        path=str(path),
        frames=kept,
        timestamps=torch.tensor([(1 / video_fps) * i for i in indices], dtype=torch.float32).tolist(),
        frame_types=["slow" if s else "fast" for s in tracker.is_slow],
        indices=indices,
        slow_size=slow_size,
        fast_size=fast_size,
        video_fps=float(video_fps),
        total_frames=total_frames,
    )
