"""CPU costs of the agent runtime: what isolation adds per python call, parser and search throughput.

Prints a table and writes JSON (``--out``). Peers measured in the same run: a bare ``python -c`` process
(the sandbox without its isolation and limits) and ``json.loads`` over the same call payloads.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keye_agents import LocalSearch, Sandbox, ToolCall, parse_tool_calls, render_tool_calls


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sandbox_rows(repeat: int) -> list[dict]:
    rows = []
    with Sandbox() as box:
        one_shot = median_s(lambda: box.run("print(1)", timeout_s=30), repeat)
    bare = median_s(
        lambda: subprocess.run([sys.executable, "-I", "-c", "print(1)"], capture_output=True), repeat
    )
    rows.append(
        {
            "what": "python call, one-shot sandbox",
            "ms": one_shot * 1e3,
            "peer": "bare python -c",
            "peer_ms": bare * 1e3,
        }
    )
    with Sandbox(persistent=True) as box:
        box.run("x = 0", timeout_s=30)
        warm = median_s(lambda: box.run("x += 1", timeout_s=30), repeat * 5)
    rows.append(
        {
            "what": "python call, persistent session",
            "ms": warm * 1e3,
            "peer": "bare python -c",
            "peer_ms": bare * 1e3,
        }
    )
    return rows


def parser_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    replies, payloads = [], []
    for i in range(n):
        calls = [
            ToolCall(f"tool_{j}", {"code": f"x = {rng.randrange(10**6)}\n" * 8, "k": j}) for j in range(3)
        ]
        replies.append(f"Step {i}: thinking about it.\n" + render_tool_calls(calls))
        payloads += [json.dumps({"name": c.name, "arguments": c.arguments}) for c in calls]
    size_mb = sum(len(r) for r in replies) / 1e6
    t_parse = median_s(lambda: [parse_tool_calls(r) for r in replies], 5)
    t_json = median_s(lambda: [json.loads(p) for p in payloads], 5)
    return [{"what": f"parse {n} replies x 3 calls", "ms": t_parse * 1e3, "MB_per_s": size_mb / t_parse,
             "peer": "json.loads of the call bodies", "peer_ms": t_json * 1e3}]  # fmt: skip


def search_rows(passages: int) -> list[dict]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with tempfile.TemporaryDirectory() as root:
        for d in range(passages // 10):
            lines = [" ".join(rng.choices(words, k=12)) for _ in range(60)]
            Path(root, f"doc{d}.md").write_text("\n".join(lines))
        t0 = time.perf_counter()
        index = LocalSearch(root)
        build = time.perf_counter() - t0
        query = median_s(lambda: index.search(" ".join(rng.choices(words, k=4)), k=5), 50)
    return [
        {"what": f"BM25 index build, {len(index.passages)} passages", "ms": build * 1e3},
        {"what": "BM25 query, k=5", "ms": query * 1e3},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--replies", type=int, default=2000)
    parser.add_argument("--passages", type=int, default=10000)
    parser.add_argument("--out", default="bench_runtime.json")
    args = parser.parse_args()
    rows = sandbox_rows(args.repeat) + parser_rows(args.replies) + search_rows(args.passages)
    print(f"{'what':45} {'ms':>9} {'peer':>30} {'peer ms':>9} {'ratio':>7}")
    for r in rows:
        peer = f"{r['peer']:>30} {r['peer_ms']:9.2f} {r['ms'] / r['peer_ms']:7.2f}" if "peer" in r else ""
        print(f"{r['what']:45} {r['ms']:9.2f} {peer}")
    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
