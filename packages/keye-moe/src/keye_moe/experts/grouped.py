"""``torch.nn.functional.grouped_mm`` experts: one grouped GEMM for gate/up, one for down.

On Hopper this runs cuBLAS/CUTLASS grouped kernels in bf16; on the CPU torch has a (slow) fallback that
tests use. Experts with zero tokens are empty groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye_moe.experts import check_expert_inputs
from keye_moe.experts.routing import combine, dispatch


def grouped_mm_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    check_expert_inputs(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
    d = dispatch(topk_ids, gate_up_proj.shape[0])
    x = hidden[d.tokens]
    gate, up = F.grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=d.offsets).chunk(2, dim=-1)
    y = F.grouped_mm((F.silu(gate) * up).contiguous(), down_proj.transpose(-2, -1), offs=d.offsets)
    return combine(y, d, topk_weights)


class GroupedMMExperts:
    def __call__(self, hidden, topk_ids, topk_weights, gate_up_proj, down_proj):
        return grouped_mm_experts(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
