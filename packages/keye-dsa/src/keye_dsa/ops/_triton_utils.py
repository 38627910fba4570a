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
