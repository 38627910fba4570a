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
