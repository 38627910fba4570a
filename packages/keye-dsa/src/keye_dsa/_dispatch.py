"""Picks the Triton kernel or the PyTorch reference for an op.

The kernel runs on CUDA tensors; the reference everywhere else. ``KEYE_DSA_IMPL=reference`` forces the
reference (debugging a kernel), ``KEYE_DSA_IMPL=triton`` forces the kernel, which on CPU tensors only
works under ``TRITON_INTERPRET=1`` (how the tests exercise the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "reference", "triton")


def impl_for(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op on these tensors."""
    choice = os.environ.get("KEYE_DSA_IMPL", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"KEYE_DSA_IMPL must be one of {_CHOICES}; got {choice!r}")
    if choice == "auto":
        return "triton" if all(t.is_cuda for t in tensors) else "reference"
    on_cpu = not all(t.is_cuda for t in tensors)
    if choice == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("KEYE_DSA_IMPL=triton on CPU tensors needs TRITON_INTERPRET=1")
    return choice
