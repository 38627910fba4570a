"""Comparison helpers shared by keye-dsa's tests and benchmarks (kernel vs reference)."""

from __future__ import annotations

import torch

# Relative-error budgets for kernel-vs-reference checks, by input dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
