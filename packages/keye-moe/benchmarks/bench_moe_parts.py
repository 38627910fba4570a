"""Where the MoE block forward spends its time, and tile sweeps of the Triton expert kernels.

A tuning companion to ``bench_moe.py`` (whose block table goes to BENCHMARKS.md): at the Qwen3-30B-A3B
shape it checks the fused router, the plan kernels and the Triton experts against their references on
the GPU, then times each forward part (router, plan, gate/up kernel, down kernel, k-sum) next to the
bare ``F.grouped_mm`` GEMM of the same part, profiles one block forward+backward, and sweeps tile
configurations of the two forward kernels (the gate/up one with and without TMA weight loads).

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
from keye_moe.experts.routing import dispatch, weighted_sum
from keye_moe.experts.triton import function as TF
from keye_moe.experts.triton import kernels as K
from keye_moe.experts.triton.plan import make_plan, reference_plan
from keye_moe.layers.topk_softmax import reference_topk_softmax

GATE_UP_SWEEP = [
    (64, 64, 4, 4),
    (64, 64, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 128, 8, 3),
    (128, 32, 8, 5),
]
DOWN_SWEEP = [
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (256, 64, 8, 3),
    (128, 128, 8, 3),
    (256, 64, 8, 4),
    (256, 32, 8, 5),
]


@contextlib.contextmanager
def setup(kernel=None, config=None, tma: bool | None = None):
    """Restrict ``kernel`` to one config (no autotuning) and/or force TMA on or off, for the block."""
    saved_tma = K.tma_ok
    saved = kernel.configs if kernel is not None else None
    if config is not None:
        bn, bk, warps, stages = config
        kernel.configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)]
    if tma is False:
        K.tma_ok = lambda *tensors: False
    try:
        yield
    finally:
        K.tma_ok = saved_tma
        if kernel is not None:
            kernel.configs = saved


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
        print(f"time {name:<44} {ms:8.4f} ms{extra}", flush=True)
        return ms

    # ------------------------------------------------------------------ correctness on fresh inputs
    small = expert_case(77, 3, 9, 80, 40, torch.float32, seed=1, unused=(2, 5))
    (x, ids, w, gu_w, dn_w), grad = small
    outs = {}
    for label, tma in (("tma", None), ("pointer", False)):
        for tt in (x, w, gu_w, dn_w):
            tt.grad = None
        with setup(tma=tma):
            TF.triton_experts(x, ids, w, gu_w, dn_w).backward(grad)
            out = TF.triton_experts(x, ids, w, gu_w, dn_w).detach()
        outs[label] = [out] + [tt.grad.clone() for tt in (x, w, gu_w, dn_w)]
    for tt in (x, w, gu_w, dn_w):
        tt.grad = None
    ref_out = loop_experts(x, ids, w, gu_w, dn_w)
    ref_out.backward(grad)
    ref = [ref_out.detach()] + [tt.grad.clone() for tt in (x, w, gu_w, dn_w)]
    for label, got in outs.items():
        errs = [rel(a, b) for a, b in zip(got, ref)]
        report["checks"][f"fp32 awkward {label}"] = errs
        print(
            f"check fp32 77x(3 of 9) h80 i40 {label:<8} out/dx/dw/dgu/ddown "
            + " ".join(f"{v:.1e}" for v in errs)
        )

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
    plan_ok = all(
        torch.equal(getattr(p_new, f), getattr(p_ref, f)) for f in ("row_slot", "block_expert", "counts")
    )
    report["checks"]["plan equals argsort plan"] = plan_ok
    print(f"check plan (block_m {bm}) equals the argsort plan: {plan_ok}")
    results = {}
    for name in ("loop", "triton"):
        leaves = [tt.detach().requires_grad_() for tt in (xb, wts, gate_up, down)]
        out = table[name](leaves[0], ids, leaves[1], leaves[2], leaves[3])
        out.backward(gb)
        results[name] = [out.detach()] + [tt.grad for tt in leaves]
    errs = [rel(a, b) for a, b in zip(results["triton"], results["loop"])]
    report["checks"]["bf16 experts triton vs loop"] = errs
    print("check bf16 experts triton vs loop out/dx/dw/dgu/ddown " + " ".join(f"{v:.1e}" for v in errs))
    del results, leaves, out
    save()

    # ------------------------------------------------------------------ forward parts
    with torch.no_grad():

        def old_router():
            lg = F.linear(xb, block.gate.weight)
            r_ids, _, probs = reference_topk_softmax(lg, k, True)
            return block.gate._stats(probs, r_ids, None)

        timed("router before (PyTorch ops, with stats)", old_router)
        timed("router logits GEMM alone", lambda: F.linear(xb, block.gate.weight))
        timed("router now (GEMM + fused kernel, with stats)", lambda: block.gate(xb))
        timed("router now, no stats", lambda: block.gate(xb, None, False))
        timed("plan before (argsort, searchsorted)", lambda: reference_plan(ids, e, bm))
        timed("plan now (two kernels)", lambda: make_plan(ids, e, bm))
        act, _ = TF.gate_up_swiglu(xb, gate_up, p_new, store_preact=False)
        y = TF.down_scatter(act, wts, down, p_new)
        timed(
            "gate_up + SwiGLU kernel (autotuned)",
            lambda: TF.gate_up_swiglu(xb, gate_up, p_new, False),
            flops * 2 / 3,
        )
        timed(
            "down kernel, weight + scatter (autotuned)",
            lambda: TF.down_scatter(act, wts, down, p_new),
            flops / 3,
        )
        timed("k-sum of weighted slot rows (now)", lambda: y.view(t, k, h).sum(1))
        timed("weighted sum by bmm (before)", lambda: weighted_sum(y, wts))
        if hasattr(F, "grouped_mm"):
            d = dispatch(ids, e)
            xs = xb[d.tokens]
            acts = torch.randn(t * k, i, device=DEV, dtype=dtype)
            timed("gather x rows (index)", lambda: xb[d.tokens])
            timed(
                "bare grouped_mm gate_up GEMM",
                lambda: F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=d.offsets),
                flops * 2 / 3,
            )
            timed(
                "bare grouped_mm down GEMM",
                lambda: F.grouped_mm(acts, down.transpose(-2, -1), offs=d.offsets),
                flops / 3,
            )
        timed(
            "experts call now (plan + kernels + sum)",
            lambda: table["triton"](xb, ids, wts, gate_up, down),
            flops,
        )
        block.implementation = "triton"
        timed("block forward now", lambda: block(xb[None])[0], flops)

    def fwd_bwd():
        for p in block.parameters():
            p.grad = None
        xx = xb[None].detach().requires_grad_()
        block(xx)[0].backward(gb[None])

    timed("block forward+backward now", fwd_bwd, 3 * flops)
    save()
    if CUDA:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))

    # ------------------------------------------------------------------ tile sweeps
    def gate_up_fn(plan):
        return lambda: TF.gate_up_swiglu(xb, gate_up, plan, False)

    def down_fn(plan):
        a = TF.gate_up_swiglu(xb, gate_up, plan, False)[0]
        return lambda: TF.down_scatter(a, wts, down, plan)

    sweeps = (
        (K.gate_up_swiglu_kernel, GATE_UP_SWEEP, "gate_up", flops * 2 / 3, gate_up_fn),
        (K.grouped_gemm_kernel, DOWN_SWEEP, "down", flops / 3, down_fn),
    )
    with torch.no_grad():
        for kernel, sweep, label, part_flops, make_fn in sweeps:
            for block_m in (128, 64) if not quick else (bm,):
                fn = make_fn(make_plan(ids, e, block_m))
                for config in sweep if block_m == 128 else sweep[:2]:
                    for tma in (True, False) if label == "gate_up" else (False,):
                        if time.perf_counter() - t_start > args.budget_s:
                            print("sweep budget spent; stopping")
                            save()
                            return
                        row = {"kernel": label, "block_m": block_m, "config": config, "tma": tma}
                        try:
                            with setup(kernel, config, tma):
                                ms = bench(fn)
                            row.update(ms=ms, tflops=part_flops / ms / 1e9)
                        except Exception as exc:
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        report["sweep"].append(row)
                        save()
                        speed = f"{row.get('ms', float('nan')):8.4f} ms {row.get('tflops', 0):7.1f} TFLOP/s"
                        print(f"sweep {label:<8} BM{block_m:<4} {config} tma={tma!s:<5} {speed} "
                              f"{row.get('error', '')}", flush=True)  # fmt: skip
    save()
    print(f"done in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
