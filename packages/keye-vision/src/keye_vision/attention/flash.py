"""Packed attention through flash-attn's ``flash_attn_varlen_func`` (optional extra ``flash``)."""

from __future__ import annotations

import importlib.util

import torch


def available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
