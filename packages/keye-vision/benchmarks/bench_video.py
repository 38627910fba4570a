"""CPU video sampling benchmark: keye_vision.load_video vs PyAV on the same long file, and peak RSS.

Every measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
Writes a JSON file and prints a table. Run from the repository root:
    .venv/bin/python packages/keye-vision/benchmarks/bench_video.py --out outputs/bench_video.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))


MODES = ("baseline", "keye", "keye_2", "keye_decode", "keye_decode_2", "pyav", "pyav_reformatter",
         "pyav_reformatter_threads", "pyav_2threads")  # fmt: skip
PEERS = ("pyav", "pyav_reformatter", "pyav_reformatter_threads", "pyav_2threads")


def pyav_part(path: str, part: list[int], out: list) -> None:
    """PyAV peer for one thread: seek to the keyframe before ``part[0]``, decode in order to ``part[-1]``,
    keep the wanted frames as RGB (frame index from the pts: these files have a constant frame rate)."""
    import av
    from av.video.reformatter import VideoReformatter

    want, reformatter = set(part), VideoReformatter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps, base = float(stream.average_rate), stream.time_base
        if part[0] > 0:
            container.seek(int(part[0] / fps / base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            i = round(float(frame.pts * base) * fps)
            if i in want:
                out.append(reformatter.reformat(frame, format="rgb24").to_ndarray())
            if i >= part[-1]:
                break


# One measurement, run as `python bench_video.py --child MODE PATH`; prints a JSON line.
def child(mode: str, path: str, threads: int) -> None:
    import resource

    import torch

    torch.set_num_threads(threads)
    import av
    import torchcodec.decoders
    from av.video.reformatter import VideoReformatter

    from keye_vision import decode_chunks, load_video, sample_count, sample_indices

    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()  # imports stay out; their RSS is "baseline"
    frames = 0
    if mode in ("keye", "keye_2"):  # the whole preprocessing: sampling, slow/fast, resizing
        sample = load_video(path, decode_workers=1 if mode == "keye" else 2)
        frames = len(sample.frames)
    elif mode in ("keye_decode", "keye_decode_2"):  # sampling alone: load_video's indices and decoding
        decoder = torchcodec.decoders.VideoDecoder(path, seek_mode="approximate", dimension_order="NHWC")
        total, fps = decoder.metadata.num_frames, decoder.metadata.average_fps
        wanted = sample_indices(total, sample_count(total, fps))
        workers = 1 if mode == "keye_decode" else 2
        kept = list(decode_chunks(path, wanted, workers=workers, seek_mode="approximate", decoder=decoder))
        frames = sum(len(k) for k in kept)
    elif mode == "pyav_2threads":  # the file's two halves in two threads, each its own container
        with av.open(path) as container:
            stream = container.streams.video[0]
            total, fps = stream.frames, float(stream.average_rate)
        wanted = sample_indices(total, sample_count(total, fps))
        halves, outs = (wanted[: len(wanted) // 2], wanted[len(wanted) // 2 :]), ([], [])
        threads = [threading.Thread(target=pyav_part, args=(path, h, o)) for h, o in zip(halves, outs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        frames = sum(len(o) for o in outs)
    elif mode in PEERS:  # decode in order, keep the sampled frames as RGB arrays
        with av.open(path) as container:
            stream = container.streams.video[0]
            if mode == "pyav_reformatter_threads":
                stream.thread_type = "AUTO"
            total, fps = stream.frames, float(stream.average_rate)
            wanted = sample_indices(total, sample_count(total, fps))
            want = set(wanted)
            kept = []
            # frame.to_ndarray(format=...) builds a new swscale context per frame (~1 ms at 256x144);
            # one reused VideoReformatter converts the same pixels in ~0.1 ms.
            reformatter = VideoReformatter()
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    if mode == "pyav":
                        kept.append(frame.to_ndarray(format="rgb24"))
                    else:
                        kept.append(reformatter.reformat(frame, format="rgb24").to_ndarray())
                if i >= wanted[-1]:
                    break
        frames = len(kept)
    elif mode != "baseline":
        raise ValueError(f"unknown mode {mode!r}")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "frames": frames,
                      "peak_rss_mb": peak_mb, "load_avg_1min": load}))  # fmt: skip


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
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
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
            for mode in args.modes:
                runs.setdefault(mode, []).append(measure(mode, path, args.threads))
                print(json.dumps({"minutes": minutes, **runs[mode][-1]}), flush=True)
        for mode, rows in runs.items():
            row = {"minutes": minutes, "mode": mode, "frames": rows[0]["frames"],
                   "seconds": statistics.median(r["seconds"] for r in rows),
                   "seconds_all": [r["seconds"] for r in rows],
                   "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rows),
                   "load_avg_1min": [r["load_avg_1min"] for r in rows],
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows)}  # fmt: skip
            row["video_seconds_per_second"] = minutes * 60 / row["seconds"] if row["frames"] else None
            results.append(row)
        # Throughput ratios to the PyAV peers measured in the same run (median seconds).
        this = [r for r in results if r["minutes"] == minutes]
        peers = {r["mode"]: r["seconds"] for r in this if r["mode"] in PEERS}
        for r in this:
            if r["frames"] and peers:
                r["x_pyav"] = peers["pyav"] / r["seconds"] if "pyav" in peers else float("nan")
                r["x_best_pyav"] = min(peers.values()) / r["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"width": args.width, "height": args.height, "fps": args.fps,
                                          "results": results}, indent=1))  # fmt: skip
    print(f"\n{'video':>7} {'mode':>24} {'frames':>6} {'seconds':>8} {'cpu s':>6} {'video s/s':>9} "
          f"{'x pyav':>6} {'x best':>6} {'peak RSS MB':>11}")  # fmt: skip
    for r in results:
        vps = f"{r['video_seconds_per_second']:.0f}" if r["video_seconds_per_second"] else "-"
        ratios = (
            f"{r['x_pyav']:>6.2f} {r['x_best_pyav']:>6.2f}" if "x_best_pyav" in r else f"{'-':>6} {'-':>6}"
        )
        print(f"{r['minutes']:>5g}m {r['mode']:>24} {r['frames']:>6} {r['seconds']:>8.2f} "
              f"{r['cpu_seconds']:>6.2f} {vps:>9} {ratios} {r['peak_rss_mb']:>11.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
