"""Packed attention through ``F.scaled_dot_product_attention``: the CPU path (and fp32 on CUDA).

Items of equal length (every frame of a video, same-sized images) are stacked and run as one batched
SDPA call, so a video costs one call per distinct frame size instead of one per frame; no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    del max_seqlen
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    groups: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        if length:
            groups.setdefault(length, []).append(start)
    out = torch.empty_like(q)
    for length, group_starts in groups.items():
        index = torch.tensor(group_starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
        index = index.reshape(-1)
        # [n, L, H, D] -> [n, H, L, D]
        qg, kg, vg = (x.index_select(0, index).unflatten(0, (-1, length)).transpose(1, 2) for x in (q, k, v))
        og = F.scaled_dot_product_attention(qg, kg, vg)
        out = out.index_copy(0, index, og.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return out
