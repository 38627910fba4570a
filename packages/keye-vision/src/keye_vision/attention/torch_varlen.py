"""Packed attention through ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16)."""

from __future__ import annotations

import torch


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    # Positional arguments only: the keyword set differs between torch 2.11 and 2.13; the default
    # (no window, no causal mask) is the full attention a ViT needs.
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
