"""CPU video sampling benchmark: keye_vision.load_video vs PyAV on the same long file, and peak RSS.

Every measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
Writes a JSON file and prints a table. Run from the repository root:
    .venv/bin/python packages/keye-vision/benchmarks/bench_video.py --out outputs/bench_video.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))


MODES = ("baseline", "keye", "keye_ffmpeg_threads", "keye_decode", "pyav", "pyav_threads")


# One measurement, run as `python bench_video.py --child MODE PATH`; prints a JSON line.
def child(mode: str, path: str, threads: int) -> None:
    import resource

    import torch

    torch.set_num_threads(threads)
    import av
    import torchcodec.decoders

    from keye_vision import load_video, sample_count, sample_indices

    start = time.perf_counter()  # imports stay out of the time; their memory is the baseline row
    frames = 0
    if mode in ("keye", "keye_ffmpeg_threads"):
        sample = load_video(path, num_threads=1 if mode == "keye" else 0)
        frames = len(sample.frames)
    elif mode == "keye_decode":  # sampling alone: the same indices, torchcodec, in load_video's chunks
        decoder = torchcodec.decoders.VideoDecoder(path, seek_mode="approximate", dimension_order="NHWC")
        total, fps = decoder.metadata.num_frames, decoder.metadata.average_fps
        wanted = sample_indices(total, sample_count(total, fps))
        kept = [decoder.get_frames_at(wanted[i : i + 32]).data for i in range(0, len(wanted), 32)]
        frames = sum(len(k) for k in kept)
    elif mode in ("pyav", "pyav_threads"):
        with av.open(path) as container:
            stream = container.streams.video[0]
            if mode == "pyav_threads":
                stream.thread_type = "AUTO"
            total, fps = stream.frames, float(stream.average_rate)
            wanted = sample_indices(total, sample_count(total, fps))
            want = set(wanted)
            kept = []
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    kept.append(frame.to_ndarray(format="rgb24"))
                if i >= wanted[-1]:
                    break
        frames = len(kept)
    elif mode != "baseline":
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "frames": frames, "peak_rss_mb": peak_mb}))


def measure(mode: str, path: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(path), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--media", default="outputs/bench_media", help="where the long videos are written")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=144)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench_video.json")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return
    import sample_media

    media = Path(args.media)
    results = []
    for minutes in args.minutes:
        path = media / f"long_{minutes:g}min_{args.width}x{args.height}_{args.fps:g}fps.mp4"
        if not path.exists():
            t = time.perf_counter()
            sample_media.write_long_video(path, seconds=minutes * 60, fps=args.fps, width=args.width,
                                          height=args.height)  # fmt: skip
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
        # Round-robin repeats, median per mode: the machine is shared, so load drifts during a run.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for mode in MODES:
                runs.setdefault(mode, []).append(measure(mode, path, args.threads))
                print(json.dumps({"minutes": minutes, **runs[mode][-1]}), flush=True)
        for mode, rows in runs.items():
            row = {"minutes": minutes, "mode": mode, "frames": rows[0]["frames"],
                   "seconds": statistics.median(r["seconds"] for r in rows),
                   "seconds_all": [r["seconds"] for r in rows],
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows)}  # fmt: skip
            row["video_seconds_per_second"] = minutes * 60 / row["seconds"] if row["frames"] else None
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"width": args.width, "height": args.height, "fps": args.fps,
                                          "results": results}, indent=1))  # fmt: skip
    print(f"\n{'video':>7} {'mode':>19} {'frames':>6} {'seconds':>8} {'video s/s':>9} {'peak RSS MB':>11}")
    for r in results:
        vps = f"{r['video_seconds_per_second']:.0f}" if r["video_seconds_per_second"] else "-"
        print(f"{r['minutes']:>5g}m {r['mode']:>19} {r['frames']:>6} {r['seconds']:>8.2f} {vps:>9} "
              f"{r['peak_rss_mb']:>11.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
