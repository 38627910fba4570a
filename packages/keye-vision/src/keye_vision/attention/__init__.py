"""Packed (varlen) attention inside each image or frame, with interchangeable backends.

Every backend takes ``q, k, v`` of shape ``[total_tokens, heads, head_dim]`` and int32 ``cu_seqlens``
(DESIGN §3) and returns ``[total_tokens, heads, head_dim]``. ``"auto"`` picks flash-attn, then torch's
varlen kernel, for fp16/bf16 on CUDA, and the SDPA path otherwise (CPU, fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import flash, torch_varlen
from .reference import reference_attention
from .sdpa import sdpa_attention

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

BACKENDS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "torch_varlen": torch_varlen.torch_varlen_attention,
    "flash": flash.flash_attention,
}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here."""
    names = ["reference", "sdpa"]
    if torch.device(device).type == "cuda":
        names += [n for n, mod in (("torch_varlen", torch_varlen), ("flash", flash)) if mod.available()]
    return names


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}"
            )
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash.available():
            return "flash"
        if torch_varlen.available():
            return "torch_varlen"
    return "sdpa"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Full (non-causal) attention within each item of a packed batch; never across items."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [total_tokens, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    return BACKENDS[select_backend(q, backend)](q, k, v, cu_seqlens, max_seqlen)


__all__ = ["BACKENDS", "available_backends", "reference_attention", "select_backend", "varlen_attention"]
