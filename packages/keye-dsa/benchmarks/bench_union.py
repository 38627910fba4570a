"""Union sparse-attention path (``ops/sparse_attention/union*.py``) against the per-query kernel.

First checks, on fresh random inputs: the GPU union plan equals its PyTorch reference; sparse attention
through the union path equals the reference (small) and the per-query kernel (8K), forward, LSE and
dQ/dK/dV, bf16 and fp32. Then times, on the structured and random index patterns of ``bench_dsa.py``:
the plan build alone, forward and forward+backward with the automatic path (union where it pays) and
with ``KEYE_DSA_SPARSE_PATH=per_query``, and the dense cuDNN peer; optionally a launch sweep first.

    PYTHONUNBUFFERED=1 python packages/keye-dsa/benchmarks/bench_union.py --out union.json
    TRITON_INTERPRET=1 python packages/keye-dsa/benchmarks/bench_union.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from bench_dsa import (
    RESULTS,
    add,
    dense_fn,
    log,
    random_indices,
    record_check,
    save,
    structured_indices,
    timed,
)

from keye_dsa import sparse_attention
from keye_dsa.ops.sparse_attention import union_kernel
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference
from keye_dsa.ops.sparse_attention.union import build_union_plan, union_plan_reference
from keye_dsa.testing import rel_err


def set_path(path: str) -> None:
    os.environ["KEYE_DSA_SPARSE_PATH"] = path


def fwd_bwd(q, k, v, idx, grad):
    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, lse = sparse_attention(qq, kk, vv, idx, return_lse=True, validate_indices=False)
    return (o, lse, *torch.autograd.grad(o, (qq, kk, vv), grad))


def correctness(dev: str, smoke: bool) -> None:
    t, s, hq, hkv, d, topk = (150, 150, 8, 2, 16, 24) if smoke else (2000, 2000, 32, 4, 128, 512)
    idx = structured_indices(t, topk, dev)
    plan, ref = build_union_plan(idx, s), union_plan_reference(idx, s)
    fits = ref.count <= plan.cap  # over the cap, the plan only knows the count is over it
    same = torch.equal(plan.count.cpu()[fits], ref.count[fits]) and torch.equal(plan.use.cpu(), ref.use)
    same &= bool((plan.count.cpu()[~fits] > plan.cap).all())
    for i in range(ref.count.numel()):
        n = int(ref.count[i])
        if n <= plan.cap:
            same &= torch.equal(plan.keys[i, :n].cpu(), ref.keys[i, :n])
            same &= torch.equal(plan.members[i, :n].cpu(), ref.members[i, :n])
    record_check(
        f"union plan == reference ({int(ref.use.sum())}/{ref.use.numel()} blocks union)",
        0.0 if same else 1.0,
        0.5,
    )
    set_path("union")
    for dtype, lim in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        name = str(dtype).split(".")[-1]
        q = torch.randn(1, t, hq, d, device=dev, dtype=dtype)
        k, v = (torch.randn(1, s, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        grad = torch.randn_like(q)
        got = fwd_bwd(q, k, v, idx, grad)
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        o, lse = sparse_attention_reference(qq, kk, vv, idx, d**-0.5)
        want = (o, lse, *torch.autograd.grad(o, (qq, kk, vv), grad))
        for part, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
            record_check(
                f"union vs reference {part} {name} T={t}", rel_err(a, b), 1e-5 if part == "lse" else 2 * lim
            )
    t = 300 if smoke else 8192
    topk = 24 if smoke else 2048
    hq, hkv, d = (8, 2, 16) if smoke else (32, 4, 128)
    for dtype, lim in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        name = str(dtype).split(".")[-1]
        for pattern in ("structured", "random"):
            idx = (
                structured_indices(t, topk, dev) if pattern == "structured" else random_indices(t, topk, dev)
            )
            q = torch.randn(1, t, hq, d, device=dev, dtype=dtype)
            k, v = (torch.randn(1, t, hkv, d, device=dev, dtype=dtype) for _ in range(2))
            grad = torch.randn_like(q)
            set_path("union")
            got = fwd_bwd(q, k, v, idx, grad)
            set_path("per_query")
            want = fwd_bwd(q, k, v, idx, grad)
            for part, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
                record_check(f"union vs per-query {part} {name} {pattern} T={t}", rel_err(a, b), lim)
    set_path("auto")


def sweep(dev: str, t: int) -> None:
    """Times union launch settings (rows per program, BLOCK_U, warps, stages) on the structured pattern at
    ``t``; keeps the fastest."""
    q = torch.randn(1, t, 32, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, t, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    idx = structured_indices(t, 2048, dev)
    plan = build_union_plan(idx, t)
    o = torch.empty_like(q)
    lse = torch.empty(1, t, 32, device=dev)
    do = torch.randn_like(q)
    delta = torch.randn(1, t, 32, device=dev)
    dq = torch.empty_like(q)
    dk, dv = (torch.zeros(k.shape, device=dev) for _ in range(2))
    union_kernel.union_attention_fwd(q, k, v, plan, o, lse, 128**-0.5)
    for name, table, options in (
        ("fwd", union_kernel.FWD_LAUNCH, [(128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2)]),
        ("bwd", union_kernel.BWD_LAUNCH, [(128, 64, 8, 1), (128, 32, 8, 1), (128, 32, 4, 1), (64, 64, 4, 1)]),
    ):  # fmt: skip
        best = None
        for rows, block_u, warps, stages in options:
            table.update(ROWS=rows, BLOCK_U=block_u, num_warps=warps, num_stages=stages)
            args = (plan, o, lse) if name == "fwd" else (plan, do, lse, delta, dq, dk, dv)
            fn = union_kernel.union_attention_fwd if name == "fwd" else union_kernel.union_attention_bwd
            try:
                ms = timed(lambda fn=fn, args=args: fn(q, k, v, *args, 128**-0.5), 5)
            except Exception as e:  # e.g. out of shared memory
                RESULTS["errors"].append(
                    f"sweep {name} {rows},{block_u},{warps},{stages}: {type(e).__name__}: {e}"
                )
                continue
            add(f"sweep union {name} rows={rows} BLOCK_U={block_u} warps={warps} stages={stages}", t, ms)
            if best is None or ms < best[0]:
                best = (ms, rows, block_u, warps, stages)
        if best is not None:
            table.update(ROWS=best[1], BLOCK_U=best[2], num_warps=best[3], num_stages=best[4])
            RESULTS["meta"][f"union_{name}_launch"] = dict(table)


def bench_length(t: int, dev: str, smoke: bool, dense: bool, path: str | None) -> None:
    hq, hkv, d, topk = (8, 2, 16, 24) if smoke else (32, 4, 128, 2048)
    reps = 1 if smoke else (2 if t >= 200_000 else 3 if t >= 100_000 else 5)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    k, v = (torch.randn(1, t, hkv, d, device=dev, dtype=dt) for _ in range(2))
    grad = torch.ones_like(q)
    if dense and dev == "cuda":
        for backward in (False, True):
            qq, kk, vv = (x.clone().requires_grad_(backward) for x in (q, k, v))
            add(
                f"dense cudnn {'fwd+bwd' if backward else 'fwd'}",
                t,
                timed(dense_fn(qq, kk, vv, "cudnn", backward), reps),
            )
            save(path)
    for pattern in ("structured", "random"):
        idx = structured_indices(t, topk, dev) if pattern == "structured" else random_indices(t, topk, dev)
        plan = build_union_plan(idx, t)
        # tensor-core work the union kernel issues (masked lanes included): QK^T and PV per union row,
        # for the 64 queries x Hq heads of its block; "useful": the selected slots only
        union_rows = int(plan.count[plan.use].sum())
        flops = {
            "union_TFLOP": 4 * union_rows * 64 * hq * d / 1e12,
            "useful_TFLOP": 4 * t * hq * topk * d / 1e12,
        }
        build_ms = timed(lambda idx=idx: build_union_plan(idx, t), reps)
        blocks = f"{int(plan.use.sum())}/{plan.use.numel()}"
        add(f"union plan build {pattern}", t, build_ms, union_blocks=blocks, max_union=int(plan.count.max()))
        for mode in ("auto", "per_query"):
            set_path(mode)
            f_ms = timed(lambda idx=idx: sparse_attention(q, k, v, idx, validate_indices=False), reps)
            add(f"sparse fwd {pattern} {mode}", t, f_ms, **(flops if mode == "auto" else {}))
            fb_ms = timed(lambda idx=idx: fwd_bwd(q, k, v, idx, grad), max(1, reps - 1))
            add(f"sparse fwd+bwd {pattern} {mode}", t, fb_ms, bwd_ms=fb_ms - f_ms)
            save(path)
        set_path("auto")
        del idx, plan
    if dev == "cuda":
        add("peak memory GiB", t, float("nan"), GiB=torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dense", action="store_true", help="time the cuDNN dense peer at each length")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("KEYE_DSA_IMPL", "triton")
    RESULTS["meta"] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                       "commit": os.environ.get("KEYE_COMMIT", "unknown")}  # fmt: skip
    if not args.skip_correctness:
        log("correctness:")
        correctness(dev, args.smoke)
        save(args.out)
    if args.sweep:
        sweep(dev, 300 if args.smoke else 32768)
        save(args.out)
    log("timings:")
    for t in [300] if args.smoke else [int(x) for x in args.lengths.split(",")]:
        try:
            bench_length(t, dev, args.smoke, args.dense, args.out)
        except torch.OutOfMemoryError as e:
            RESULTS["errors"].append(f"T={t}: out of memory: {e}")
    save(args.out)
    failed = [c for c in RESULTS["correctness"] if not c["ok"]]
    log(f"\n{len(RESULTS['correctness']) - len(failed)}/{len(RESULTS['correctness'])} checks passed")
    for row in RESULTS["timings"]:
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k not in ("case", "T", "ms"))  # fmt: skip
        log(f"{row['case']:<44} T={row['T']:>7} {row['ms']:9.2f} ms {extra}")
    for e in RESULTS["errors"]:
        log(f"error: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
