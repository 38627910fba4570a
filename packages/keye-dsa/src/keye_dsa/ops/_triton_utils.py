"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, whose CPU ``tl.dot`` multiplies bf16 bit patterns as integers."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """``PRECISE``: fp32 inputs get IEEE fp32 dots (not tf32); ``UPCAST``: the interpreter's workaround."""
    return {"PRECISE": dtype == torch.float32, "UPCAST": interpreting()}


@triton.jit
def mma(a, b, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; on the interpreter, operands are widened to fp32 first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def popcount(x):
    """Set bits of each uint32 lane in plain integer ops (SWAR): the interpreter runs it too, and ptxas
    turns it into one ``POPC``."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def softmax_step(q, kt, vt, keep, m, l, acc, qk_scale, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a gathered key/value tile (log2 domain): scores ``q @ kt^T`` where
    ``keep``, the running max ``m``, sum ``l`` and output ``acc`` rescaled and updated."""
    s = mma(q, tl.trans(kt), PRECISE, UPCAST)
    s = tl.where(keep, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(vt.dtype), vt, PRECISE, UPCAST)
    return m_new, l, acc


@triton.jit
def softmax_finish(acc, m, l):
    """The normalized output and the natural-log LSE of each row (0 and ``-inf`` for a row without keys)."""
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / 1.4426950408889634)
    return out, lse


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still as fp32: the cast that follows
    is then exact on the GPU and under the interpreter, whose own fp32 -> bf16 cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x):
    """fp32 ``x`` (``|x| <= 448``) rounded to the nearest FP8 e4m3 value (ties to even), still as fp32, as
    ``round_to_bf16`` is: the interpreter's fp32 -> e4m3 cast drops the carry of a mantissa that rounds
    up (126.6 became 64). Normal values keep 3 mantissa bits; below 2**-6 the grid is 2**-9."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = (bits & 0x7FFFFFFF) >= 0x3C800000  # |x| >= 2**-6
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    v = tl.abs(x) * 512.0  # exact: subnormals as multiples of 2**-9
    n = tl.floor(v)
    odd = (n - 2.0 * tl.floor(n * 0.5)) != 0.0
    up = ((v - n) > 0.5) | (((v - n) == 0.5) & odd)
    small = (n + up.to(tl.float32)) * 0.001953125
    return tl.where(normal, rounded, tl.where(x < 0, -small, small))  # -0.0 stays signed
