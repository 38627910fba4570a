"""Where the MoE block forward spends its time, and tile sweeps of the Triton expert kernels.

A tuning companion to ``bench_moe.py`` (whose block table goes to BENCHMARKS.md): at the Qwen3-30B-A3B
shape it checks the fused router, the plan kernels and the Triton experts against their references on
the GPU, then times each forward part (router, plan, gate/up kernel, down kernel, k-sum) next to the
bare ``F.grouped_mm`` GEMM of the same part, lists every kernel of one block forward (and of one
forward+backward) with its time, and sweeps the two forward GEMM kernels over tile configurations (the
down projection both as the persistent TMA kernel and as the pointer-load ``grouped_gemm_kernel``).

Last, it times the whole expert path per rows-per-tile choice (``BLOCK_M_SWEEP``: 128 or 256 rows, with
their tiles), checking each output against the first.

Usage: python bench_moe_parts.py [--quick] [--out parts.json]; ``--quick`` (or no GPU) runs tiny shapes
in the Triton interpreter to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import CUDA, DEV, bench, ensure_plugins, expert_case, random_block, rel

from keye_moe.experts.loop import loop_experts
from keye_moe.experts.routing import dispatch
from keye_moe.experts.triton import function as TF
from keye_moe.experts.triton import kernels as K
from keye_moe.experts.triton.plan import make_plan, reference_plan
from keye_moe.layers.topk_softmax import reference_topk_softmax

# (kernel, tiles (BLOCK_N, BLOCK_K, warps, stages), TMA): the down kernel without TMA is grouped_gemm_kernel
SWEEP = [
    ("gate_up", (128, 64, 8, 3), True),
    ("gate_up", (128, 32, 8, 5), True),
    ("gate_up", (128, 64, 8, 4), True),
    ("down", (256, 64, 8, 4), True),
    ("down", (256, 64, 8, 3), True),
    ("down", (256, 64, 8, 3), False),
]
PINNED = {"gate_up": (128, 64, 8, 3), "down": (256, 64, 8, 4)}  # the 2026-11-30 winners
# (rows per tile, gate/up tiles, down tiles). 256 rows halve the weight tiles' re-reads from L2 but were
# slower on the H200 (2026-12-07: expert path 2.93-2.97 ms against 2.48 ms at 128 rows, BENCHMARKS.md);
# 256 rows with 16-warp tiles do not compile (ptxas runs out of registers), so they are not listed.
BLOCK_M_SWEEP = [
    (128, PINNED["gate_up"], PINNED["down"]),
    (128, (128, 64, 16, 3), (256, 64, 16, 3)),
    (256, (64, 64, 8, 3), (128, 64, 8, 3)),
    (256, (64, 64, 8, 4), (128, 64, 8, 4)),
]


@contextlib.contextmanager
def setup(kernel=None, config=None, tma: bool | None = None, down_tma: bool | None = None):
    """Restrict ``kernel`` to one config (no autotuning) and/or force TMA off (everywhere, or only for the
    down projection, which then runs ``grouped_gemm_kernel``), for the block."""
    saved_tma = K.tma_ok
    saved = kernel.configs if kernel is not None else None
    if config is not None:
        bn, bk, warps, stages = config
        kernel.configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)]
    if tma is False:
        K.tma_ok = lambda *tensors: False
    if down_tma is False:
        K.tma_ok = lambda *tensors: len(tensors) == 1 and saved_tma(*tensors)
    try:
        yield
    finally:
        K.tma_ok = saved_tma
        if kernel is not None:
            kernel.configs = saved


@contextlib.contextmanager
def pinned():
    """The GEMM kernels on pinned configs (no autotuning in a time-limited run; the weight-gradient
    kernel on its first candidate)."""
    wgrad = K.grouped_wgrad_kernel.configs
    K.grouped_wgrad_kernel.configs = wgrad[:1]
    try:
        with setup(K.gate_up_swiglu_kernel, PINNED["gate_up"]), setup(K.down_scatter_kernel, PINNED["down"]):
            yield
    finally:
        K.grouped_wgrad_kernel.configs = wgrad


def kernel_table(prof, title: str, report: dict) -> None:
    """Every GPU kernel of the profiled region: calls and mean microseconds per call, in launch order."""
    rows: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.setdefault(ev.name, []).append(ev.device_time)
    listing = [(name, len(times), sum(times) / len(times)) for name, times in rows.items()]
    report.setdefault("profile", {})[title] = listing
    total = sum(n * us for _, n, us in listing)
    print(f"profile {title}: {total:.1f} us of kernels over all calls")
    for name, n, us in listing:
        print(f"  {n:4d} x {us:9.1f} us  {name[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_moe_parts.json"))
    parser.add_argument("--budget-s", type=float, default=170.0, help="skip the remaining sweeps after this")
    args = parser.parse_args()
    ensure_plugins()
    t_start = time.perf_counter()
    quick = args.quick or not CUDA
    dtype = torch.bfloat16 if CUDA else torch.float32
    t, h, e, k, i = (256, 64, 8, 2, 32) if quick else (16384, 2048, 128, 8, 768)
    flops = 6 * t * k * h * i
    report: dict = {"shape": [t, h, e, k, i], "checks": {}, "ms": {}, "sweep": []}

    def save():
        report["seconds"] = time.perf_counter() - t_start
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    def timed(name, fn, gemm_flops=None):
        ms = bench(fn)
        report["ms"][name] = ms
        extra = f" {gemm_flops / ms / 1e9:7.1f} TFLOP/s" if gemm_flops else ""
        print(f"time {name:<52} {ms:8.4f} ms{extra}", flush=True)
        return ms

    def elapsed() -> str:
        return f"[{time.perf_counter() - t_start:5.0f}s]"

    # ------------------------------------------------------------------ correctness on fresh inputs
    small = expert_case(77, 3, 9, 80, 40, torch.float32, seed=1, unused=(2, 5))
    (x, ids, w, gu_w, dn_w), grad = small
    ref_out = loop_experts(x, ids, w, gu_w, dn_w)
    ref_out.backward(grad)
    ref = [ref_out.detach()] + [tt.grad.clone() for tt in (x, w, gu_w, dn_w)]
    for label, tma in (("TMA", None), ("pointers", False)):
        for tt in (x, w, gu_w, dn_w):
            tt.grad = None
        with setup(tma=tma):
            out = TF.triton_experts(x, ids, w, gu_w, dn_w)
            out.backward(grad)
        errs = [rel(a, b) for a, b in zip([out.detach()] + [tt.grad for tt in (x, w, gu_w, dn_w)], ref)]
        report["checks"][f"fp32 awkward {label}"] = errs
        print(
            f"check fp32 77x(3 of 9) h80 i40 {label:<16} out/dx/dw/dgu/ddown "
            + " ".join(f"{v:.1e}" for v in errs)
        )
    print(elapsed(), flush=True)

    block, table = random_block(h, e, k, i, dtype)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    xb = torch.randn(t, h, device=DEV, dtype=dtype)
    gb = torch.randn(t, h, device=DEV, dtype=dtype)
    with torch.no_grad():
        logits = F.linear(xb, block.gate.weight)
        ids, wts, _ = block.gate(xb)
        ref_ids, ref_w, _ = reference_topk_softmax(logits, k, True)
    same = (ids == ref_ids).all(1).float().mean().item()
    w_err = (wts.float().sort(1).values - ref_w.float().sort(1).values).abs().max().item()
    report["checks"]["router rows with identical ids"] = same
    report["checks"]["router max |weight diff| (sorted)"] = w_err
    print(
        f"check router: rows with identical ids {same:.5f} (ties may order differently), max |dw| {w_err:.2e}"
    )
    bm = TF.pick_block_m(ids.numel(), e)
    p_new, p_ref = make_plan(ids, e, bm), reference_plan(ids, e, bm)
    fields = ("row_slot", "block_expert", "counts", "used_blocks")
    plan_ok = all(torch.equal(getattr(p_new, f), getattr(p_ref, f)) for f in fields)
    report["checks"]["plan equals argsort plan"] = plan_ok
    print(f"check plan (block_m {bm}) equals the argsort plan: {plan_ok}; used blocks "
          f"{int(p_new.used_blocks)} of {p_new.num_blocks}")  # fmt: skip
    results = {}
    with pinned():
        for name in ("loop", "triton"):
            leaves = [tt.detach().requires_grad_() for tt in (xb, wts, gate_up, down)]
            out = table[name](leaves[0], ids, leaves[1], leaves[2], leaves[3])
            out.backward(gb)
            results[name] = [out.detach()] + [tt.grad for tt in leaves]
    errs = [rel(a, b) for a, b in zip(results["triton"], results["loop"])]
    report["checks"]["bf16 experts triton vs loop"] = errs
    print("check bf16 experts triton vs loop out/dx/dw/dgu/ddown " + " ".join(f"{v:.1e}" for v in errs))
    del results, leaves, out
    print(elapsed(), flush=True)
    save()

    # ------------------------------------------------------------------ forward parts and kernel lists
    block.implementation = "triton"

    def fwd_bwd():
        for p in block.parameters():
            p.grad = None
        xx = xb[None].detach().requires_grad_()
        block(xx)[0].backward(gb[None])

    with pinned():
        with torch.no_grad():
            timed("router (GEMM + fused kernel, with stats)", lambda: block.gate(xb))
            timed("router logits GEMM alone", lambda: F.linear(xb, block.gate.weight))
            timed("plan (three kernels)", lambda: make_plan(ids, e, bm))
            act, _ = TF.gate_up_swiglu(xb, gate_up, p_new, store_preact=False)
            y = TF.down_scatter(act, wts, down, p_new)
            timed("k-sum of weighted slot rows", lambda: TF.sum_slots(y, k))
            if hasattr(F, "grouped_mm"):
                d = dispatch(ids, e)
                xs = xb[d.tokens]
                acts = torch.randn(t * k, i, device=DEV, dtype=dtype)
                w1, w2 = gate_up.transpose(-2, -1), down.transpose(-2, -1)
                timed(
                    "bare grouped_mm gate_up GEMM",
                    lambda: F.grouped_mm(xs, w1, offs=d.offsets),
                    flops * 2 / 3,
                )
                timed("bare grouped_mm down GEMM", lambda: F.grouped_mm(acts, w2, offs=d.offsets), flops / 3)
                del xs, acts
            timed("block forward", lambda: block(xb[None])[0], flops)
            with setup(down_tma=False):
                timed(
                    "block forward, down projection by grouped_gemm_kernel", lambda: block(xb[None])[0], flops
                )
        timed("block forward+backward", fwd_bwd, 3 * flops)
        save()
        if CUDA:
            with (
                torch.no_grad(),
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
            ):
                block(xb[None])
                torch.cuda.synchronize()
            kernel_table(prof, "block forward", report)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fwd_bwd()
                torch.cuda.synchronize()
            kernel_table(prof, "block forward+backward", report)
    print(elapsed(), flush=True)
    save()

    # ------------------------------------------------------------------ tiles
    def gate_up_fn(plan):
        return lambda: TF.gate_up_swiglu(xb, gate_up, plan, False)

    def down_fn(plan):
        a = TF.gate_up_swiglu(xb, gate_up, plan, False)[0]
        return lambda: TF.down_scatter(a, wts, down, plan)

    kernels = {
        "gate_up": (K.gate_up_swiglu_kernel, flops * 2 / 3, gate_up_fn(p_new), act),
        "down": (K.grouped_gemm_kernel, flops / 3, down_fn(p_new), y),
    }
    with torch.no_grad():
        for label, config, tma in SWEEP:
            kernel, part_flops, fn, expected = kernels[label]
            if label == "down" and not tma:
                kernel = K.grouped_gemm_kernel
            used = (
                len(expected) if label == "down" else int(p_new.used_blocks) * p_new.block_m
            )  # no tail rows
            if time.perf_counter() - t_start > args.budget_s:
                print("sweep budget spent; stopping")
                break
            row = {"kernel": label, "config": config, "tma": tma}
            try:
                with setup(kernel, config, down_tma=tma):
                    got = fn()
                    got = got[0] if isinstance(got, tuple) else got
                    row["max_abs_diff_vs_pinned"] = float(
                        (got[:used].float() - expected[:used].float()).abs().max()
                    )
                    ms = bench(fn)
                row.update(ms=ms, tflops=part_flops / ms / 1e9)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            report["sweep"].append(row)
            save()
            speed = f"{row.get('ms', float('nan')):8.4f} ms {row.get('tflops', 0):7.1f} TFLOP/s"
            diff = row.get("max_abs_diff_vs_pinned", float("nan"))
            print(f"sweep {label:<8} {config} tma={tma!s:<5} {speed} diff {diff:.1e} {row.get('error', '')} "
                  f"{elapsed()}", flush=True)  # fmt: skip
    save()
    block_m_sweep(report, save, xb, ids, wts, gate_up, down, k, flops, quick, t_start, args.budget_s)
    print(f"done in {time.perf_counter() - t_start:.0f}s")


def block_m_sweep(report, save, xb, ids, wts, gate_up, down, k, flops, quick, t_start, budget_s) -> None:
    """The whole expert path (gate/up, down, slot sum) per (rows per tile, tiles) of ``BLOCK_M_SWEEP``,
    its output against the pinned tiles at 128 rows (the slot sums compare across plans; the padded
    rows do not)."""
    e = gate_up.shape[0]
    sweep = (
        [(16, (16, 16, 4, 1), (16, 16, 4, 1)), (32, (16, 16, 4, 1), (32, 16, 4, 1))]
        if quick
        else BLOCK_M_SWEEP
    )

    def experts(plan, gu_cfg, dn_cfg):
        with setup(K.gate_up_swiglu_kernel, gu_cfg), setup(K.down_scatter_kernel, dn_cfg):
            return TF.sum_slots(
                TF.down_scatter(TF.gate_up_swiglu(xb, gate_up, plan, False)[0], wts, down, plan), k
            )

    rows = report["block_m_sweep"] = []
    with torch.no_grad():
        plans = {bm: make_plan(ids, e, bm) for bm in {row[0] for row in sweep}}
        expected = experts(plans[sweep[0][0]], sweep[0][1], sweep[0][2])
        for bm, gu_cfg, dn_cfg in sweep:
            if time.perf_counter() - t_start > budget_s:
                print("sweep budget spent; stopping")
                break
            plan = plans[bm]
            row = {
                "block_m": bm,
                "gate_up": gu_cfg,
                "down": dn_cfg,
                "padded_rows": int(plan.used_blocks) * bm,
            }
            try:
                row["rel_err_vs_first"] = rel(experts(plan, gu_cfg, dn_cfg), expected)
                with setup(K.gate_up_swiglu_kernel, gu_cfg):
                    row["gate_up_ms"] = bench(lambda plan=plan: TF.gate_up_swiglu(xb, gate_up, plan, False))
                    act = TF.gate_up_swiglu(xb, gate_up, plan, False)[0]
                with setup(K.down_scatter_kernel, dn_cfg):
                    row["down_ms"] = bench(lambda plan=plan, act=act: TF.down_scatter(act, wts, down, plan))
                row["experts_ms"] = bench(lambda plan=plan, g=gu_cfg, d=dn_cfg: experts(plan, g, d))
                row["experts_tflops"] = flops / row["experts_ms"] / 1e9
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            save()
            print("block_m sweep " + " ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                                              for a, b in row.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
