"""Token dispatch shared by the grouped backends: sort the N*K (token, expert) slots by expert.

No host synchronization: the grouped GEMMs take device-side offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    order: torch.Tensor  # [N*K] int64: flat slot index (token * K + k) of each sorted row
    tokens: torch.Tensor  # [N*K] int64: token of each sorted row
    counts: torch.Tensor  # [E] int64: rows per expert
    offsets: torch.Tensor  # [E] int32: cumulative end row of each expert (grouped_mm's ``offs``)


def dispatch(topk_ids: torch.Tensor, num_experts: int) -> Dispatch:
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    return Dispatch(order, order // topk_ids.shape[1], counts, torch.cumsum(counts, 0).to(torch.int32))


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert without a host sync (``bincount`` reads the maximum back to size its output)."""
    ones = torch.ones_like(flat_ids)
    return torch.zeros(num_experts, dtype=flat_ids.dtype, device=flat_ids.device).index_add_(
        0, flat_ids, ones
    )


def combine(rows: torch.Tensor, d: Dispatch, topk_weights: torch.Tensor) -> torch.Tensor:
    """Un-sort expert outputs ``[N*K, H]`` and take the weighted sum over k, deterministically."""
    return weighted_sum(rows.new_empty(rows.shape).index_copy_(0, d.order, rows), topk_weights)


def weighted_sum(flat: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``[N*K, H]`` rows in slot order -> ``[N, H]``: a batched ``[1, K] @ [K, H]`` (fp32 accumulation)."""
    n, k = topk_weights.shape
    return torch.bmm(topk_weights.to(flat.dtype)[:, None, :], flat.view(n, k, flat.shape[-1])).squeeze(1)
