"""keye-dsa benchmark (issue 3 §5): correctness of every GPU kernel against its reference, then timings.

Batch 1, bf16, Hq=32, Hkv=4, D=128, 4 index heads of dim 128, top-k 2048, T in {8K, 32K, 128K, 256K}:
sparse attention forward and forward+backward on two index patterns (random, structured), indexer +
top-k, the whole DSA forward against dense causal attention through torch SDPA (cuDNN and flash
backends, same run), the indexer KL of both stages against the chunked PyTorch path (T <= 32K), and
decoding one token against a 128K cache at batch 8.

    PYTHONUNBUFFERED=1 python packages/keye-dsa/benchmarks/bench_dsa.py --out results.json
    TRITON_INTERPRET=1 python packages/keye-dsa/benchmarks/bench_dsa.py --smoke   # CPU: tiny shapes

Counting (written into the JSON too):
- sparse attention forward bytes: per query and KV group, the K and V rows of its top-k (bf16), plus
  Q, O and the int32 indices once; FLOPs 4 * T * Hq * topk * D.
- sparse attention backward bytes: K and V gathered again, dK and dV accumulated as fp32 atomics per
  gathered row (counted as 4 + 4 bytes per element), Q, O, dO and dQ once.
- dense causal attention FLOPs: 2 * T^2 * Hq * D forward, 2.5x that for the backward.
- indexer FLOPs: T^2 / 2 * H_I * D_I * 2 (the candidate path writes no score matrix: only about
  2 * topk (score, position) pairs per query).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from decode_case import decode_case, fill_static_cache, graph_replay_ms, graphed  # this folder (on sys.path)

from keye_dsa import (
    DSACache,
    DSAttention,
    StaticDSACache,
    indexer_kl_loss,
    select_topk,
    select_topk_decode,
    sparse_attention,
)
from keye_dsa.modules import indexer as indexer_module
from keye_dsa.ops.index_prologue import index_prologue
from keye_dsa.ops.index_prologue.reference import index_prologue_reference
from keye_dsa.ops.indexer_kl.reference import indexer_kl_reference
from keye_dsa.ops.indexer_topk.decode import dequantize_index_keys
from keye_dsa.ops.indexer_topk.reference import indexer_scores_reference, select_topk_reference
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference
from keye_dsa.rope import rope_cos_sin
from keye_dsa.testing import rel_err

RESULTS: dict = {"meta": {}, "ceilings": {}, "correctness": [], "timings": [], "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def save(path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events; host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def ceilings(dev: str) -> None:
    if dev != "cuda":
        return
    src = torch.randn(1 << 30, dtype=torch.float32, device=dev)  # 4 GiB
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=10)
    RESULTS["ceilings"]["copy_TBps"] = 2 * src.numel() * 4 / ms / 1e9
    src = dst = None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, reps=20)
    RESULTS["ceilings"]["bf16_matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    log(f"ceilings: {RESULTS['ceilings']}")


def record_check(name: str, value: float, limit: float) -> None:
    ok = math.isfinite(value) and value < limit
    RESULTS["correctness"].append({"check": name, "rel_err": value, "limit": limit, "ok": ok})
    log(f"  check {name:<52} rel_err={value:.2e} (< {limit:g}) {'OK' if ok else 'FAIL'}")


def correctness(dev: str, smoke: bool) -> None:
    """Kernel vs reference on fresh random inputs: sparse attention fwd/bwd, top-k, KL."""
    os.environ["KEYE_DSA_IMPL"] = "triton"
    t, s, hq, hkv, d, k = (37, 53, 8, 2, 16, 9) if smoke else (1500, 2500, 32, 4, 128, 2048)
    for dtype, lim in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        q = torch.randn(1, t, hq, d, device=dev, dtype=dtype, requires_grad=True)
        kk = torch.randn(1, s, hkv, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, s, hkv, d, device=dev, dtype=dtype, requires_grad=True)
        idx = torch.randint(-1, s, (1, t, k), device=dev, dtype=torch.int32)
        o, lse = sparse_attention(q, kk, v, idx, return_lse=True)
        g = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, kk, v), g)
        o_ref, lse_ref = sparse_attention_reference(q, kk, v, idx, d**-0.5)
        grads_ref = torch.autograd.grad(o_ref, (q, kk, v), g)
        name = str(dtype).split(".")[-1]
        record_check(f"sparse_attention fwd {name}", rel_err(o, o_ref), lim)
        record_check(f"sparse_attention lse {name}", rel_err(lse, lse_ref), 1e-5)
        for gname, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
            record_check(f"sparse_attention {gname} {name}", rel_err(a, b), 2 * lim)
    tq, sk, h, di, topk = (29, 61, 4, 32, 7) if smoke else (3000, 9000, 4, 128, 2048)
    for dtype in (torch.bfloat16, torch.float32):
        qi = torch.randn(2, tq, h, di, device=dev, dtype=dtype)
        ki = torch.randn(2, sk, di, device=dev, dtype=dtype)
        w = torch.randn(2, tq, h, device=dev, dtype=dtype)
        start = torch.tensor([0, 17], device=dev)
        got = select_topk(qi, ki, w, topk, key_start=start)
        ref = select_topk_reference(qi, ki, w, topk, key_start=start)
        scores = indexer_scores_reference(qi, ki, w, key_start=start)

        def picked(ix, scores=scores):
            vals = torch.gather(scores, 2, ix.long().clamp_min(0))
            return torch.where(ix >= 0, vals, 0.0).sort(-1).values

        name = str(dtype).split(".")[-1]
        record_check(f"select_topk selected scores {name}", rel_err(picked(got), picked(ref)), 1e-6)
        same = (got.sort(-1).values == ref.sort(-1).values).float().mean().item()
        record_check(f"select_topk index sets differ (fraction) {name}", 1 - same, 1e-3)
    b, t2, hq2, hkv2, d2, h2, di2 = (1, 40, 8, 2, 16, 2, 16) if smoke else (1, 1024, 32, 4, 128, 4, 128)
    q = torch.randn(b, t2, hq2, d2, device=dev)
    kk = torch.randn(b, t2, hkv2, d2, device=dev)
    qi = torch.randn(b, t2, h2, di2, device=dev, requires_grad=True)
    ki = torch.randn(b, t2, di2, device=dev, requires_grad=True)
    w = torch.randn(b, t2, h2, device=dev, requires_grad=True)
    for stage in ("dense", "sparse"):
        idx = (
            None
            if stage == "dense"
            else select_topk(qi.detach(), ki.detach(), w.detach(), 8 if smoke else 256)
        )
        got = indexer_kl_loss(q, kk, qi, ki, w, indices=idx)
        want = indexer_kl_reference(q, kk, qi, ki, w, indices=idx, scale=d2**-0.5).sum()
        g1 = torch.autograd.grad(got, (qi, ki, w))
        g2 = torch.autograd.grad(want, (qi, ki, w))
        record_check(f"indexer_kl {stage} loss", rel_err(got, want), 1e-4)
        for name, a, b_ in zip(("q_index", "k_index", "weights"), g1, g2):
            record_check(f"indexer_kl {stage} grad {name}", rel_err(a, b_), 1e-3)
    prologue_checks(dev, smoke)


def prologue_checks(dev: str, smoke: bool) -> None:
    """The indexer prologue kernel against its reference: a decode step's batch and a prefill chunk, bf16
    and fp32, rotary angles from positions (plain and M-RoPE, up to 256K) or given, FP8 keys, Hadamard.
    The fp32 rows bound the angles too: with log2(theta) rounded to fp32 they would be off by up to
    ~6e-3 rad at 256K, a 1e-3 error where 1e-5 is allowed."""
    h, di = (2, 16) if smoke else (4, 128)
    sections = [di // 8, di // 8 * 3 // 2, di // 2 - di // 8 - di // 8 * 3 // 2]
    for (b, t), dtype, fp8, hadamard, rotation in (
        ((8, 1), torch.bfloat16, True, False, "positions"),
        ((8, 1), torch.float32, False, False, "positions"),
        ((2, 37 if smoke else 1500), torch.bfloat16, True, True, "mrope"),
        ((2, 37 if smoke else 1500), torch.float32, False, False, "mrope"),
        ((8, 1), torch.bfloat16, False, True, "cos_sin"),
    ):
        lim = 1e-2 if dtype == torch.bfloat16 else 1e-5
        q_all = torch.randn(b, t, h * di + h, device=dev, dtype=dtype) * 3
        k = torch.randn(b, t, di, device=dev, dtype=dtype)
        pos = torch.randint(0, 1 << 18, (3, b, t) if rotation == "mrope" else (b, t), device=dev)
        rotary = (
            dict(rope=rope_cos_sin(pos, di, 1e6))
            if rotation == "cos_sin"
            else dict(position_ids=pos, rope_theta=1e6, sections=sections if rotation == "mrope" else None)
        )
        norms = [torch.rand(di, device=dev, dtype=dtype) + 0.5 for _ in range(2)]
        inputs = (q_all, k, *norms, torch.randn(di, device=dev, dtype=dtype))
        opts = dict(num_heads=h, q_eps=1e-6, k_eps=1e-6, hadamard=hadamard, fp8_keys=fp8, **rotary)
        with torch.no_grad():
            got = index_prologue(*inputs, **opts)
            want = index_prologue_reference(*inputs, out_dtype=dtype, **opts)
        extras = (", FP8 keys" if fp8 else "") + (", Hadamard" if hadamard else "")
        name = f"{str(dtype)[6:]} {b} x {t}, {rotation}{extras}"
        record_check(f"index_prologue q_index {name}", rel_err(got[0], want[0]), lim)
        record_check(f"index_prologue weights {name}", rel_err(got[2], want[2]), 1e-6)
        if fp8:
            deq, deq_ref = dequantize_index_keys(got[1], got[3]), dequantize_index_keys(want[1], want[3])
            record_check(f"index_prologue FP8 keys {name}", rel_err(deq, deq_ref), 2e-2)
        else:
            record_check(f"index_prologue k_index {name}", rel_err(got[1], want[1]), lim)


def random_indices(t: int, topk: int, dev: str, offset: int = 0) -> torch.Tensor:
    """Uniform random visible keys per query (every key visible when t + 1 <= topk)."""
    pos = torch.arange(t, device=dev)[:, None] + offset
    slot = torch.arange(topk, device=dev)[None, :]
    rnd = (torch.rand(t, topk, device=dev) * (pos + 1)).long()
    return torch.where(pos + 1 <= topk, torch.where(slot <= pos, slot, -1), rnd).to(torch.int32)[None]


def structured_indices(t: int, topk: int, dev: str, block: int = 64) -> torch.Tensor:
    """The issue's trained-indexer pattern: the ``topk / 4`` newest keys plus ``3 topk / 4`` keys drawn
    from a pool of ``topk`` earlier positions shared by the ``block`` queries of a block.

    Like a real top-k, a query's indices are distinct: the pool is stratified (one position in each of
    ``topk`` equal integer strata of the keys before the block's recent window), so it neither repeats
    itself nor meets the recent keys (only blocks with fewer than ``topk`` such keys, right after the
    first ``topk`` queries, can repeat)."""
    recent, pool = topk // 4, topk
    n_blocks = (t + block - 1) // block
    width = ((torch.arange(n_blocks, device=dev) * block - recent) // pool).clamp_min(1)[:, None]
    offset = (torch.rand(n_blocks, pool, device=dev) * width).long()
    pools = torch.arange(pool, device=dev) * width + offset
    q = torch.arange(t, device=dev)
    cols = (torch.randint(0, pool, (t, 1), device=dev) + torch.arange(topk - recent, device=dev)) % pool
    pick = pools.view(-1)[(q // block)[:, None] * pool + cols]
    rec = q[:, None] - torch.arange(recent, device=dev)[None, :]
    idx = torch.cat([rec, pick], 1)
    idx = torch.where(idx >= 0, idx, -1).to(torch.int32)
    head = min(t, topk)  # queries that see at most topk keys take them all
    idx[:head] = random_indices(head, topk, dev)[0]
    return idx[None]


def dense_fn(q, k, v, backend, backward: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[
        backend
    ]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel(be):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            if backward:
                out.backward(torch.ones_like(out))
        return out

    return run


def add(case: str, t: int, ms: float, **extra) -> None:
    row = {"case": case, "T": t, "ms": ms, **extra}
    RESULTS["timings"].append(row)
    log(
        f"  {case:<44} T={t:>7} {ms:10.2f} ms "
        + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    )


def bench_length(t: int, dev: str, smoke: bool, reps: int, path: str | None) -> None:
    hq, hkv, d, h_i, d_i, topk = (8, 2, 16, 4, 16, 16) if smoke else (32, 4, 128, 4, 128, 2048)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(t)
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    k = torch.randn(1, t, hkv, d, device=dev, dtype=dt)
    v = torch.randn(1, t, hkv, d, device=dev, dtype=dt)
    qi = torch.randn(1, t, h_i, d_i, device=dev, dtype=dt)
    ki = torch.randn(1, t, d_i, device=dev, dtype=dt)
    w = torch.randn(1, t, h_i, device=dev, dtype=torch.float32)
    ceil = RESULTS["ceilings"]
    bw, mm = ceil.get("copy_TBps", float("nan")), ceil.get("bf16_matmul_TFLOPs", float("nan"))
    dense_flops = 2 * t * t * hq * d
    dense = {}
    for backend in ("cudnn", "flash") if dev == "cuda" else ("math",):
        for backward in (False, True):
            name = f"dense {backend} {'fwd+bwd' if backward else 'fwd'}"
            try:
                qq, kk2, vv = (x.clone().requires_grad_(backward) for x in (q, k, v))
                ms = timed(dense_fn(qq, kk2, vv, backend, backward), reps)
                flops = dense_flops * (3.5 if backward else 1.0)
                dense[(backend, backward)] = ms
                add(name, t, ms, TFLOPs=flops / ms / 1e9, frac_matmul_peak=flops / ms / 1e9 / mm)
            except Exception as e:  # a backend may not support a shape; record and go on
                RESULTS["errors"].append(f"{name} T={t}: {type(e).__name__}: {e}")
                log(f"  {name} T={t}: unavailable ({type(e).__name__})")
            save(path)
    peer_f = dense.get(("cudnn", False)) or dense.get(("flash", False)) or dense.get(("math", False))
    peer_fb = dense.get(("cudnn", True)) or dense.get(("flash", True)) or dense.get(("math", True))
    sel_ms = timed(lambda: select_topk(qi, ki, w, topk), reps)
    idx_flops = t * t / 2 * h_i * d_i * 2
    add("indexer + top-k", t, sel_ms, vs_dense_cudnn_fwd=sel_ms / peer_f if peer_f else float("nan"),
        TFLOPs=idx_flops / sel_ms / 1e9)  # fmt: skip
    save(path)
    if dev == "cuda":
        stage_breakdown(qi, ki, w, topk, t, reps)
    if t <= 32768:
        kl_timings(q, k, qi, ki, w, topk, t, reps)
    k_eff = min(topk, t)
    fwd_bytes = t * hkv * k_eff * d * 2 * 2 + 2 * t * hq * d * 2 + t * topk * 4
    bwd_bytes = t * hkv * k_eff * d * (2 * 2 + 2 * 4) + 4 * t * hq * d * 2 + t * topk * 4
    sa_flops = 4 * t * hq * k_eff * d
    for pattern in ("random", "structured"):
        idx = random_indices(t, topk, dev) if pattern == "random" else structured_indices(t, topk, dev)
        f_ms = timed(lambda idx=idx: sparse_attention(q, k, v, idx, validate_indices=False), reps)
        add(f"sparse attention fwd {pattern}", t, f_ms, TBps=fwd_bytes / f_ms / 1e9,
            frac_roofline=fwd_bytes / f_ms / 1e9 / bw, TFLOPs=sa_flops / f_ms / 1e9)  # fmt: skip
        qq, kk2, vv = (x.clone().requires_grad_(True) for x in (q, k, v))

        def fb(idx=idx, qq=qq, kk2=kk2, vv=vv):
            out = sparse_attention(qq, kk2, vv, idx, validate_indices=False)
            out.backward(torch.ones_like(out))

        fb_ms = timed(fb, max(1, reps - 1))
        b_ms = fb_ms - f_ms
        add(f"sparse attention fwd+bwd {pattern}", t, fb_ms, bwd_ms=b_ms, bwd_TBps=bwd_bytes / b_ms / 1e9,
            bwd_frac_roofline=bwd_bytes / b_ms / 1e9 / bw)  # fmt: skip
        whole_f = sel_ms + f_ms
        whole_fb = sel_ms + fb_ms
        add(f"DSA fwd (indexer+top-k+sparse) {pattern}", t, whole_f,
            speedup_vs_dense_fwd=(peer_f / whole_f) if peer_f else float("nan"))  # fmt: skip
        add(f"DSA fwd+bwd {pattern}", t, whole_fb,
            speedup_vs_dense_fwdbwd=(peer_fb / whole_fb) if peer_fb else float("nan"))  # fmt: skip
        del idx, qq, kk2, vv
        save(path)
    if dev == "cuda":
        RESULTS["timings"].append({"case": "peak memory GiB", "T": t, "ms": float("nan"),
                                   "GiB": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
        torch.cuda.reset_peak_memory_stats()


def kl_timings(q, k, qi, ki, w, topk, t, reps) -> None:
    """Indexer KL of both stages, Triton kernel against the chunked PyTorch path: the sparse stage (random
    top-k indices) forward+backward, the dense warm-up forward and forward+backward.

    Dense FLOPs count the visible (query, key) pairs ``T (T + 1) / 2`` times, per pair, the target's
    ``q k^T`` twice in the forward (log-sum-exps, then the probabilities: ``2 * 2 Hq D``) plus the
    indexer's ``2 H_I D_I``; the backward rebuilds both twice (query- and key-major launches) and adds
    one gradient GEMM each: ``2 * (2 Hq D + 4 H_I D_I)``."""
    idx = random_indices(t, topk, q.device.type)
    qi_g, ki_g, w_g = (x.detach().clone().requires_grad_(True) for x in (qi, ki, w))
    hq, d, h_i, d_i = q.shape[2], q.shape[3], qi.shape[2], qi.shape[3]
    pairs = t * (t + 1) / 2
    fwd_flops = pairs * (4 * hq * d + 2 * h_i * d_i)
    bwd_flops = pairs * 2 * (2 * hq * d + 4 * h_i * d_i)

    def run(indices, backward):
        def go():
            loss = indexer_kl_loss(q, k, qi_g, ki_g, w_g, indices=indices)
            if backward:
                loss.backward()

        return go

    for impl in ("triton", "reference"):
        os.environ["KEYE_DSA_IMPL"] = impl
        n = max(1, reps - 2) if impl == "triton" else 1
        add(f"indexer KL sparse fwd+bwd ({impl})", t, timed(run(idx, True), n))
        f_ms = timed(run(None, False), n)
        add(f"indexer KL dense fwd ({impl})", t, f_ms, TFLOPs=fwd_flops / f_ms / 1e9)
        fb_ms = timed(run(None, True), n)
        add(f"indexer KL dense fwd+bwd ({impl})", t, fb_ms, TFLOPs=(fwd_flops + bwd_flops) / fb_ms / 1e9)
    os.environ["KEYE_DSA_IMPL"] = "triton"


def stage_breakdown(qi, ki, w, topk, t, reps) -> None:
    """Times the three stages of ``select_topk``'s candidate path on its last (longest) query chunk."""
    from keye_dsa.ops.indexer_topk import triton_kernel as tk

    rows = min(t, tk.chunk_rows(1, t, t, topk))
    c0 = t - rows
    q, ww = qi[:, c0:].contiguous(), w[:, c0:].contiguous()
    out = torch.empty(1, rows, topk, dtype=torch.int32, device=qi.device)
    lo = torch.zeros(1, rows, dtype=torch.int32, device=qi.device)
    hi = torch.arange(c0, t, dtype=torch.int32, device=qi.device)[None]
    sample_ms = timed(lambda: tk.sample_thresholds(q, ki, ww, lo, hi, 0, t, topk), reps)
    thr = tk.sample_thresholds(q, ki, ww, lo, hi, 0, t, topk)
    score_ms = timed(lambda: tk.score_candidates(q, ki, ww, lo, hi, 0, t, thr, topk), reps)
    cand = tk.score_candidates(q, ki, ww, lo, hi, 0, t, thr, topk)
    select_ms = timed(lambda: tk.select_candidates(*cand, lo, hi, lo, out), reps)
    flagged = int(tk.select_candidates(*cand, lo, hi, lo, out).sum())
    flops = rows * (c0 + (rows + 1) / 2) * qi.shape[2] * qi.shape[3] * 2  # visible (query, key) pairs
    add("last chunk: sample + score/filter + select", t, sample_ms + score_ms + select_ms, rows=rows,
        sample_ms=sample_ms, score_ms=score_ms, score_TFLOPs=flops / score_ms / 1e9, select_ms=select_ms,
        mean_candidates=cand[1].float().mean().item(), flagged_rows=flagged)  # fmt: skip


def bench_decode(dev: str, smoke: bool, reps: int) -> None:
    """One new token per row against a 128K cache at batch 8, eager and replayed from a CUDA graph.

    DSA runs on a preallocated cache of a larger capacity with the filled length as a device tensor
    (``select_topk_decode``), the way a graph-captured decoder keeps it; dense SDPA reads exactly the
    filled keys. Both are timed eager and graphed, in the same run; the index-key cache both in bf16
    and in FP8 e4m3 with a per-key scale (``quantize_index_keys``).
    """
    torch.manual_seed(0)  # the draw of sweep_decode.py: the top-k's cost depends on the gates (ties at 0)
    case = decode_case(dev, smoke, torch.bfloat16 if dev == "cuda" else torch.float32)
    b, s, topk, lengths = case.b, case.s, case.topk, case.lengths
    q, k, v, qi, ki, w, k8, k_scale = case.q, case.k, case.v, case.qi, case.ki, case.w, case.k8, case.k_scale
    qt = q.transpose(1, 2)
    kt, vt = (x[:, :s].transpose(1, 2).contiguous() for x in (k, v))
    kv_bytes = 2 * kt.numel() * kt.element_size()

    def dense():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    def select():
        return select_topk_decode(qi, ki, w, topk, lengths, validate=False)

    def select_fp8():
        return select_topk_decode(qi, k8, w, topk, lengths, k_scale=k_scale, validate=False)

    idx = select()

    def sparse():
        return sparse_attention(q, k, v, idx, validate_indices=False)

    def dsa():
        return sparse_attention(q, k, v, select(), validate_indices=False)

    def dsa_fp8():
        return sparse_attention(q, k, v, select_fp8(), validate_indices=False)

    want = select_topk(qi, ki[:, :s], w, topk)
    record_check("decode: select_topk_decode == select_topk (same index sets)", float(
        not torch.equal(idx.sort(-1).values, want.sort(-1).values)), 0.5)  # fmt: skip
    ref = indexer_scores_reference(qi, ki[:, :s], w)  # fp32 scores of the bf16 inputs
    picked = torch.gather(ref, 2, idx.long().clamp_min(0)).sort(-1).values
    record_check("decode: selected scores vs reference top-k", rel_err(picked, ref.topk(topk, -1).values.sort(
        -1).values), 1e-3)  # fmt: skip
    deq = dequantize_index_keys(k8, k_scale)[:, :s]
    want8 = select_topk_reference(qi, deq, w, topk)
    record_check("decode: FP8 cache == reference on the dequantized keys (same index sets)", float(
        not torch.equal(select_fp8().sort(-1).values, want8.sort(-1).values)), 0.5)  # fmt: skip
    record_check("decode: sparse output vs reference", rel_err(sparse(), sparse_attention_reference(
        q, k, v, idx, q.shape[-1] ** -0.5)[0]), 1e-2)  # fmt: skip
    label = f"decode (batch {b}, {s // 1024}K cache)"
    dense_ms = timed(dense, reps)
    add(f"{label} dense SDPA eager", s, dense_ms, TBps=kv_bytes / dense_ms / 1e9)
    dsa_ms = timed(dsa, reps)
    add(f"{label} DSA eager", s, dsa_ms, speedup_vs_dense=dense_ms / dsa_ms)
    if dev != "cuda":
        return
    # graphs: the GPU's time for one replay, and on an idle GPU (the host's launch of the graph included)
    dense_g, dense_idle = graph_replay_ms(graphed(dense), reps)
    add(f"{label} dense SDPA graph", s, dense_g, TBps=kv_bytes / dense_g / 1e9, idle_gpu_ms=dense_idle)
    parts = {
        "indexer + top-k": select, "indexer + top-k, FP8 index keys": select_fp8, "sparse attention": sparse,
        "DSA": dsa, "DSA, FP8 index keys": dsa_fp8,
    }  # fmt: skip
    for name, fn in parts.items():
        ms, idle = graph_replay_ms(graphed(fn), reps)
        add(f"{label} {name} graph", s, ms, speedup_vs_dense_graph=dense_g / ms, idle_gpu_ms=idle,
            speedup_vs_dense_graph_idle_gpu=dense_idle / idle)  # fmt: skip


def bench_decode_layer(dev: str, smoke: bool, reps: int) -> None:
    """A whole ``DSAttention`` layer's decode step (projections, q/k norms, RoPE, the indexer, cache
    writes, top-k, sparse attention, output projection) on a ``StaticDSACache`` filled to 128K at batch 8,
    against the same layer with its indexer off, in the same run: on a ``DSACache`` view of exactly the
    filled keys (SDPA without a mask, so its flash kernel; the replay rewrites one row each time) and
    on the static cache (SDPA masked to the length on the device). What a graph-captured decoder pays
    per layer and token."""
    torch.manual_seed(0)
    shape = decode_case(dev, smoke, torch.float32, shape_only=True)
    b, s, hq, hkv, d = shape.b, shape.s, shape.hq, shape.hkv, shape.d
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    attn = DSAttention(
        hq * d, hq, hkv, d, index_heads=shape.h_i, index_head_dim=shape.d_i, topk=shape.topk
    ).to(dev, dtype).eval()  # fmt: skip
    x = torch.randn(b, 1, hq * d, device=dev, dtype=dtype)
    label = f"decode layer (batch {b}, {s // 1024}K cache, hidden {hq * d})"
    dense = None
    for name, mode, cache in (
        ("indexer off, filled keys (dense SDPA)", "off", DSACache(capacity=s + 256)),
        ("indexer off, static cache (masked SDPA)", "off", StaticDSACache(b, s + 256)),
        ("DSA", "sparse", StaticDSACache(b, s + 256)),
        ("DSA, FP8 index keys", "sparse", StaticDSACache(b, s + 256, index_dtype=torch.float8_e4m3fn)),
        ("DSA, FP8 index keys, reference prologue", "sparse",
         StaticDSACache(b, s + 256, index_dtype=torch.float8_e4m3fn)),
    ):  # fmt: skip
        attn.sa_indexer.mode = mode
        # the last row: the indexer's norms, RoPE and quantization as ~30 PyTorch ops, not one kernel
        indexer_module.index_prologue = index_prologue_reference if "reference" in name else index_prologue
        with torch.no_grad():
            if isinstance(cache, StaticDSACache):
                attn(x, cache=cache)  # allocates the buffers
                fill_static_cache(cache, s)
            else:
                # s - 2 keys: the warm-up call and the captured one each append a row, so the replay
                # (rewriting the captured row) attends over s keys
                kv = torch.randn(b, s - 2, hkv, d, device=dev, dtype=dtype)
                cache.append_kv(0, kv, torch.randn_like(kv))

            def step(cache=cache):
                return attn(x, cache=cache)

            if dev != "cuda":
                add(f"{label} {name} eager", s, timed(step, reps))
                continue
            ms, idle = graph_replay_ms(graphed(step), reps)
        extra = {"idle_gpu_ms": idle}
        if dense is None:
            dense = (ms, idle)
        else:
            extra.update(
                speedup_vs_dense_layer=dense[0] / ms, speedup_vs_dense_layer_idle_gpu=dense[1] / idle
            )
        add(f"{label} {name} graph", s, ms, **extra)
        del cache, step
        torch.cuda.empty_cache()
    indexer_module.index_prologue = index_prologue


def bench_prologue(dev: str, smoke: bool, reps: int) -> None:
    """The indexer prologue of a decode step (batch 8: norms, rotary angles from positions and RoPE, FP8
    quantization of the key), graphed: the kernel against the reference's PyTorch ops, in the same run."""
    b, h, di = 8, (2 if smoke else 4), (16 if smoke else 128)
    q_all = torch.randn(b, 1, h * di + h, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, 1, di, device=dev, dtype=torch.bfloat16)
    pos = torch.full((b, 1), 100_000, device=dev)
    norms = [torch.ones(di, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    opts = dict(
        num_heads=h, q_eps=1e-6, k_eps=1e-6, fp8_keys=True, out_dtype=torch.bfloat16, position_ids=pos,
        rope_theta=1e6,
    )  # fmt: skip
    ref_ms = None
    for name, fn in (("reference", index_prologue_reference), ("kernel", index_prologue)):
        with torch.no_grad():

            def step(fn=fn):
                return fn(q_all, k, *norms, **opts)

            if dev != "cuda":
                add(f"index prologue (batch {b}, FP8 keys) {name} eager", 1, timed(step, reps))
                continue
            ms, idle = graph_replay_ms(graphed(step), reps)
        extra = {"idle_gpu_ms": idle} if ref_ms is None else {"idle_gpu_ms": idle, "speedup": ref_ms / ms}
        ref_ms = ref_ms or ms
        add(f"index prologue (batch {b}, FP8 keys) {name} graph", 1, ms, **extra)


def sweep_launch(dev: str, t: int = 32768) -> None:
    """Times a few (BLOCK_N, num_warps, num_stages) launch settings of the sparse-attention kernels on
    random indices at ``t`` and keeps the fastest for the rest of the run."""
    from keye_dsa.ops.sparse_attention import triton_kernel as tk

    q = torch.randn(1, t, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = random_indices(t, 2048, dev)
    log(f"launch sweep at T={t}:")
    for name, table, options in (
        ("fwd", tk.FWD_LAUNCH, [(32, 4, 2), (32, 4, 3), (16, 4, 2), (32, 2, 2), (64, 4, 2)]),
        ("bwd", tk.BWD_LAUNCH, [(32, 4, 1), (32, 4, 2), (16, 2, 1), (16, 4, 1), (64, 4, 1)]),
    ):
        best = None
        for block_n, warps, stages in options:
            table.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            try:
                if name == "fwd":
                    ms = timed(lambda: sparse_attention(q, k, v, idx, validate_indices=False), 3)
                else:
                    o, lse = tk.sparse_attention_fwd(q, k, v, idx, 128**-0.5)
                    do = torch.randn_like(o)
                    ms = timed(
                        lambda o=o, lse=lse, do=do: tk.sparse_attention_bwd(
                            q, k, v, idx, o, lse, do, 128**-0.5
                        ),
                        3,
                    )
            except Exception as e:
                RESULTS["errors"].append(f"sweep {name} {block_n},{warps},{stages}: {type(e).__name__}: {e}")
                continue
            add(f"sweep sparse {name} BLOCK_N={block_n} warps={warps} stages={stages}", t, ms)
            if best is None or ms < best[0]:
                best = (ms, block_n, warps, stages)
        if best is not None:
            table.update(BLOCK_N=best[1], num_warps=best[2], num_stages=best[3])
            RESULTS["meta"][f"sparse_{name}_launch"] = dict(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--lengths", default="8192,32768,131072,262144")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the correctness checks and decode")
    ap.add_argument("--sweep", action="store_true", help="time sparse-attention launch settings at 32K first")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("KEYE_DSA_IMPL", "triton")
    lengths = [40] if args.smoke else [int(x) for x in args.lengths.split(",")]
    RESULTS["meta"] = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("KEYE_COMMIT", "unknown"),
        "shape": "batch 1, bf16, Hq=32, Hkv=4, D=128, H_I=4, D_I=128, topk=2048",
        "counting": __doc__.split("Counting (written into the JSON too):")[1].strip(),
    }
    ceilings(dev)
    if not args.skip_correctness:
        log("correctness (kernel vs reference):")
        correctness(dev, args.smoke)
        save(args.out)
    if args.sweep and dev == "cuda":
        sweep_launch(dev)
        save(args.out)
    log("timings:")
    for t in [] if args.decode_only else lengths:
        reps = 1 if args.smoke else 2 if t >= 200_000 else (3 if t >= 100_000 else 5)
        try:
            bench_length(t, dev, args.smoke, reps, args.out)
        except torch.OutOfMemoryError as e:
            RESULTS["errors"].append(f"T={t}: out of memory: {e}")
            log(f"  T={t}: out of memory")
        if dev == "cuda":
            torch.cuda.empty_cache()
    try:
        if not args.no_decode:
            bench_decode(dev, args.smoke, 1 if args.smoke else 10)
            save(args.out)
            bench_decode_layer(dev, args.smoke, 1 if args.smoke else 10)
            bench_prologue(dev, args.smoke, 1 if args.smoke else 20)
    except Exception as e:
        RESULTS["errors"].append(f"decode: {type(e).__name__}: {e}")
    save(args.out)
    failed = [c for c in RESULTS["correctness"] if not c["ok"]]
    n_checks = len(RESULTS["correctness"])
    log(f"\n{n_checks - len(failed)}/{n_checks} correctness checks passed")
    for row in RESULTS["timings"]:
        log(f"{row['case']:<44} T={row['T']:>7} {row['ms']:10.3f} ms")
    for e in RESULTS["errors"]:
        log(f"error: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
