"""Plain PyTorch reference for packed attention: one block-diagonal score matrix, softmax in fp32.

Quadratic in the total number of tokens; it exists to check the fast paths, not to run models.
"""

from __future__ import annotations

import torch


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, total]`` bool, True where query and key belong to the same item."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    item = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    if item.numel() != total:
        raise ValueError(f"cu_seqlens covers {item.numel()} tokens but q has {total}")
    return item[:, None] == item[None, :]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Non-causal attention inside each item of a packed ``[T, H, D]`` batch."""
    del max_seqlen  # the mask already knows every length
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * scale
    mask = block_diagonal_mask(cu_seqlens, q.shape[0])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hts,shd->thd", probs, v.float()).to(q.dtype)
