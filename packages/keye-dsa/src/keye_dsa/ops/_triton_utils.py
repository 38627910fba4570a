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
def e4m3_to_bf16(x):
    """FP8 e4m3 values (any shape; a multiple of 4 per thread) widened to bf16, exactly, in integer ops.

    Why not ``x.to(tl.bfloat16)``: Triton widens through fp16, three conversions per pair of values
    (``cvt.rn.f16x2.e4m3x2`` then two ``cvt.bf16.f16``) on the GPU's slow conversion pipe, which bounds a
    decode step's FP8 index-key scoring. Here each pair of bytes is moved into the top of two bf16 halves
    (``prmt``), its exponent and mantissa shifted into place: that is the bf16 of ``x * 2**-120``
    (exact, subnormal for e4m3's subnormals), which one ``fma.rn.bf16x2`` by ``2**120`` (plus -0, keeping
    the sign of zero) makes ``x`` exactly. NaN (0x7f/0xff) is not preserved (it becomes 480)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 lo, hi, s, two120, nz;
        mov.b32 two120, 0x7B807B80;
        mov.b32 nz, 0x80008000;
        prmt.b32 lo, $2, 0, 0x1404;
        prmt.b32 hi, $2, 0, 0x3424;
        shr.b32 s, lo, 4;
        and.b32 s, s, 0x07F007F0;
        and.b32 lo, lo, 0x80008000;
        or.b32 lo, lo, s;
        fma.rn.bf16x2 $0, lo, two120, nz;
        shr.b32 s, hi, 4;
        and.b32 s, s, 0x07F007F0;
        and.b32 hi, hi, 0x80008000;
        or.b32 hi, hi, s;
        fma.rn.bf16x2 $1, hi, two120, nz;
        }""",
        "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4,
    )  # fmt: skip


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
