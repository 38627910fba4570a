"""The reference expert backend: one plain matmul chain per expert that received tokens.

Slow (a Python loop with a host sync per expert), but obviously right; every fast backend is tested
against it. Sums are accumulated in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye_moe.experts import check_expert_inputs


def loop_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    check_expert_inputs(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
    out = torch.zeros(hidden.shape, dtype=torch.float, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        slots = (flat_ids == e).nonzero().squeeze(1)
        tokens = slots // topk_ids.shape[1]
        gate, up = F.linear(hidden[tokens], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        w = topk_weights.reshape(-1)[slots]
        out.index_add_(0, tokens, y.float() * w.float()[:, None])
    return out.to(hidden.dtype)


class LoopExperts:
    """Factory product for the ``loop`` name."""

    def __call__(self, hidden, topk_ids, topk_weights, gate_up_proj, down_proj):
        return loop_experts(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
