"""Orthonormal Hadamard rotation for the indexer's q/k: dot products are unchanged, while outliers are
spread over all channels, which is what lets the indexer run in FP8 (DESIGN §4)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _matrix(dim: int) -> torch.Tensor:
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dim; got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim**0.5


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last dim, with ``H`` the orthonormal Sylvester-Hadamard matrix."""
    return x @ _matrix(x.shape[-1]).to(device=x.device, dtype=x.dtype)
