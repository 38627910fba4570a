"""Triton kernel of the indexer's prologue: everything between its two projections and the top-k.

Why a kernel: in a decode step the indexer's per-token work (a head-wise RMSNorm of the queries, the
LayerNorm of the key, RoPE on both, the optional Hadamard rotation, the casts and the FP8 quantization of
the key) is ~30 elementwise PyTorch launches on a few KB each, and in a CUDA-graphed decoder the launches
are what a layer pays for them. Here one program per token does all of it in registers, in fp32 like the
reference, and writes the queries, the gates in fp32 and the key (or its FP8 bytes and scale).

Each head is held as its two RoPE halves, so the neox rotation pairs element ``j`` with ``j + D/2``
without a shuffle; the Hadamard rotation (Sylvester order) takes its first butterfly across the halves
and the rest within each half. Forward only: training (autograd) takes the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import round_to_bf16, round_to_e4m3

FP8_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _as_output(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded (to nearest, ties to even) to the output dtype's values, kept in fp32."""
    if dtype == tl.bfloat16:
        return round_to_bf16(x)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope(x1, x2, c1, c2, s1, s2):
    """Neox RoPE on the halves: ``x * cos + cat(-x2, x1) * sin``."""
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _butterflies(x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """``x [R, N] @ H_N`` (unnormalized Sylvester Hadamard, ``N = 2**LOG_N``): one butterfly stage per
    bit; stage ``i`` pairs elements ``2**i`` apart, put side by side by a reshape and permute."""
    for i in tl.static_range(LOG_N):
        y = tl.permute(tl.reshape(x, (R, N >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, N))
    return x


@triton.jit
def _rotate(x1, x2, R: tl.constexpr, HALF: tl.constexpr, LOG_HALF: tl.constexpr):
    """The orthonormal Hadamard rotation of ``[x1 | x2]``: ``[(x1+x2) @ H, (x1-x2) @ H] / sqrt(2 HALF)``
    (Sylvester's ``H_2N = [[H_N, H_N], [H_N, -H_N]]``)."""
    norm = 1.0 / tl.sqrt(2.0 * HALF)
    return _butterflies(x1 + x2, R, HALF, LOG_HALF) * norm, _butterflies(x1 - x2, R, HALF, LOG_HALF) * norm


@triton.jit
def _index_prologue(
    QA, K, COS, SIN, QW, KW, KB, QO, WO, KO, KS,
    sqa_b, sqa_t, sk_b, sk_t, sc_b, sc_t, ss_b, ss_t,
    T, H, q_eps, k_eps,
    HALF: tl.constexpr, LOG_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
    HADAMARD: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """Token ``program_id(0)`` (of ``B*T``): ``QA [B,T,H*D+H]`` (queries then gates) and ``K [B,T,D]``
    -> ``QO [B*T,H,D]``, ``WO [B*T,H]`` fp32, ``KO [B*T,D]`` (with ``FP8``: e4m3 bytes, ``KS [B*T]`` the
    per-key scale)."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    d: tl.constexpr = 2 * HALF
    hh = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_J)
    jm = j < HALF
    qm = (hh[:, None] < H) & jm[None, :]
    qa = QA + b * sqa_b + t * sqa_t
    q1 = tl.load(qa + hh[:, None] * d + j[None, :], mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(qa + hh[:, None] * d + HALF + j[None, :], mask=qm, other=0.0).to(tl.float32)
    gates = tl.load(qa + H * d + hh, mask=hh < H, other=0.0).to(tl.float32)
    kp = K + b * sk_b + t * sk_t
    k1 = tl.load(kp + j, mask=jm, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF + j, mask=jm, other=0.0).to(tl.float32)
    cp = COS + b * sc_b + t * sc_t
    sp = SIN + b * ss_b + t * ss_t
    c1 = tl.load(cp + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sp + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF + j, mask=jm, other=0.0).to(tl.float32)

    # q_norm: RMSNorm of each head, then the weight (the reference's order of roundings)
    rms = tl.rsqrt((tl.sum(q1 * q1, 1) + tl.sum(q2 * q2, 1)) / d + q_eps)
    q1 = q1 * rms[:, None] * tl.load(QW + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    q2 = q2 * rms[:, None] * tl.load(QW + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    q1, q2 = _rope(q1, q2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])

    # k_norm: LayerNorm with bias (two passes, as the padding lanes are zero and masked out)
    mean = (tl.sum(k1, 0) + tl.sum(k2, 0)) / d
    k1 = tl.where(jm, k1 - mean, 0.0)
    k2 = tl.where(jm, k2 - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(k1 * k1, 0) + tl.sum(k2 * k2, 0)) / d + k_eps)
    k1 = k1 * rstd * tl.load(KW + j, mask=jm, other=0.0).to(tl.float32)
    k2 = k2 * rstd * tl.load(KW + HALF + j, mask=jm, other=0.0).to(tl.float32)
    k1 += tl.load(KB + j, mask=jm, other=0.0).to(tl.float32)
    k2 += tl.load(KB + HALF + j, mask=jm, other=0.0).to(tl.float32)
    k1, k2 = _rope(k1, k2, c1, c2, s1, s2)

    if HADAMARD:
        q1, q2 = _rotate(q1, q2, BLOCK_H, HALF, LOG_HALF)
        k1, k2 = _rotate(k1[None, :], k2[None, :], 1, HALF, LOG_HALF)
        k1, k2 = tl.reshape(k1, (BLOCK_J,)), tl.reshape(k2, (BLOCK_J,))

    row = pid.to(tl.int64)
    out_ty: tl.constexpr = QO.dtype.element_ty
    qo = QO + row * H * d + hh[:, None] * d + j[None, :]
    tl.store(qo, _as_output(q1, out_ty).to(out_ty), mask=qm)
    tl.store(qo + HALF, _as_output(q2, out_ty).to(out_ty), mask=qm)
    tl.store(WO + row * H + hh, gates, mask=hh < H)
    # the key as the reference casts it, then (FP8) quantizes that: one scale per key
    k1, k2 = _as_output(k1, out_ty), _as_output(k2, out_ty)
    if FP8:
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(k1), 0), tl.max(tl.abs(k2), 0)), 1e-12)
        scale = tl.math.div_rn(amax, FP8_MAX)  # IEEE division, as torch's
        k1, k2 = round_to_e4m3(tl.math.div_rn(k1, scale)), round_to_e4m3(tl.math.div_rn(k2, scale))
        tl.store(KS + row, scale)
    tl.store(KO + row * d + j, k1.to(KO.dtype.element_ty), mask=jm)
    tl.store(KO + row * d + HALF + j, k2.to(KO.dtype.element_ty), mask=jm)


def index_prologue_fwd(
    q_all, k, cos, sin, q_norm_weight, k_norm_weight, k_norm_bias, num_heads, q_eps, k_eps, out_dtype,
    hadamard, fp8_keys,
):  # fmt: skip
    """The kernel's launch: ``(q_index, k_index or its FP8 bytes, weights, k_scale or None)``."""
    batch, t, _ = q_all.shape
    d = k.shape[-1]
    rows = batch * t
    dev = q_all.device
    q_index = torch.empty(batch, t, num_heads, d, dtype=out_dtype, device=dev)
    weights = torch.empty(batch, t, num_heads, dtype=torch.float32, device=dev)
    k_index = torch.empty(batch, t, d, dtype=torch.float8_e4m3fn if fp8_keys else out_dtype, device=dev)
    k_scale = torch.empty(batch, t, dtype=torch.float32, device=dev) if fp8_keys else None
    if rows == 0:
        return q_index, k_index, weights, k_scale
    q_all, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_all, k))
    cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    cos, sin = (x.expand(batch, t, d) for x in (cos, sin))
    _index_prologue[(rows,)](
        q_all, k, cos, sin, q_norm_weight, k_norm_weight, k_norm_bias, q_index, weights, k_index,
        weights if k_scale is None else k_scale,
        q_all.stride(0), q_all.stride(1), k.stride(0), k.stride(1), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), t, num_heads, q_eps, k_eps,
        HALF=d // 2, LOG_HALF=(d // 2).bit_length() - 1, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_J=triton.next_power_of_2(d // 2),
        HADAMARD=hadamard, FP8=fp8_keys, num_warps=4,
    )  # fmt: skip
    return q_index, k_index, weights, k_scale
