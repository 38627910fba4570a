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

import math
import struct

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
def _rotary_from_positions(POS, b, t, sp_axis, sp_b, sp_t, log2_theta_bits, j,
                           HALF: tl.constexpr, SEC0: tl.constexpr, SEC1: tl.constexpr):  # fmt: skip
    """cos and sin of frequency ``j`` at the token's position, in fp64 then rounded to fp32, as
    ``rope_cos_sin`` computes them (M-RoPE: frequencies below ``SEC0`` take position row 0, the next
    ``SEC1`` row 1, the rest row 2; plain RoPE passes ``SEC0 = HALF``). ``log2(theta)`` comes as the bits
    of an fp64 in an int64: a Python float argument reaches a compiled kernel as fp32, whose rounding
    would move angles by up to ~6e-3 rad at 256K positions (the interpreter keeps fp64: it would not
    show)."""
    p = POS + b * sp_b + t * sp_t
    pos = tl.load(p).to(tl.float64)
    if SEC0 < HALF:
        pos = tl.where(j < SEC0, pos, tl.load(p + sp_axis).to(tl.float64))
        pos = tl.where(j < SEC0 + SEC1, pos, tl.load(p + 2 * sp_axis).to(tl.float64))
    log2_theta = log2_theta_bits.to(tl.float64, bitcast=True)
    angle = pos * tl.exp2(-(j.to(tl.float64) * 2.0) / (2 * HALF) * log2_theta)  # theta ** (-2j / D)
    return tl.cos(angle).to(tl.float32), tl.sin(angle).to(tl.float32)


@triton.jit
def _index_prologue(
    QA, K, COS, SIN, POS, QW, KW, KB, QO, WO, KO, KS,
    sqa_b, sqa_t, sk_b, sk_t, sc_b, sc_t, ss_b, ss_t, sp_axis, sp_b, sp_t,
    T, H, q_eps, k_eps, log2_theta_bits,
    HALF: tl.constexpr, LOG_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
    FROM_POSITIONS: tl.constexpr, SEC0: tl.constexpr, SEC1: tl.constexpr, HADAMARD: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    """Token ``program_id(0)`` (of ``B*T``): ``QA [B,T,H*D+H]`` (queries then gates) and ``K [B,T,D]``
    -> ``QO [B*T,H,D]``, ``WO [B*T,H]`` fp32, ``KO [B*T,D]`` (with ``FP8``: e4m3 bytes, ``KS [B*T]`` the
    per-key scale). The rotary angles come from ``COS``/``SIN`` or, ``FROM_POSITIONS``, ``POS``."""
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
    if FROM_POSITIONS:  # the two halves share their angles
        c1, s1 = _rotary_from_positions(POS, b, t, sp_axis, sp_b, sp_t, log2_theta_bits, j, HALF, SEC0, SEC1)
        c2, s2 = c1, s1
    else:
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


def _fp64_bits(x: float) -> int:
    """The bits of ``x > 0`` as an fp64, in an int64 (past int32's range: the kernel gets an int64)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def index_prologue_fwd(
    q_all, k, q_norm_weight, k_norm_weight, k_norm_bias, *, num_heads, q_eps, k_eps, out_dtype, rope=None,
    position_ids=None, rope_theta=None, sections=None, hadamard=False, fp8_keys=False,
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
    if rope is not None:
        cos, sin = (
            x.expand(batch, t, d) if x.stride(-1) == 1 else x.contiguous().expand(batch, t, d) for x in rope
        )
        pos, pos_strides, sec = q_all, (0, 0, 0), (d // 2, 0)  # no positions: placeholders
    else:
        cos = sin = q_all  # placeholders
        pos = position_ids.expand(3, batch, t) if position_ids.dim() == 3 else position_ids.expand(batch, t)
        pos_strides = (pos.stride(0), pos.stride(1), pos.stride(2)) if pos.dim() == 3 else (0, *pos.stride())
        sec = (sections[0], sections[1]) if pos.dim() == 3 else (d // 2, 0)
    _index_prologue[(rows,)](
        q_all, k, cos, sin, pos, q_norm_weight, k_norm_weight, k_norm_bias, q_index, weights, k_index,
        weights if k_scale is None else k_scale,
        q_all.stride(0), q_all.stride(1), k.stride(0), k.stride(1), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), *pos_strides, t, num_heads, q_eps, k_eps,
        0 if rope is not None else _fp64_bits(math.log2(rope_theta)),
        HALF=d // 2, LOG_HALF=(d // 2).bit_length() - 1, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_J=triton.next_power_of_2(d // 2), FROM_POSITIONS=rope is None, SEC0=sec[0], SEC1=sec[1],
        HADAMARD=hadamard, FP8=fp8_keys, num_warps=4,
    )  # fmt: skip
    return q_index, k_index, weights, k_scale
