"""Expert backends: a loop reference, ``F.grouped_mm`` and a Triton grouped GEMM (DESIGN §5).

Every backend computes, for each token n, ``sum_k w[n, k] * down_e(silu(gate_e(x_n)) * up_e(x_n))`` with
``e = topk_ids[n, k]``, from stacked weights ``gate_up_proj [E, 2I, H]`` (gate rows first) and
``down_proj [E, H, I]``. ``check_expert_inputs`` gives every backend the same clear errors.
"""

from __future__ import annotations

import torch


def check_expert_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"experts expect hidden [N, H]; got {tuple(hidden.shape)}")
    n, h = hidden.shape
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != h or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H={h}]; got {tuple(gate_up_proj.shape)}")
    e, two_i, _ = gate_up_proj.shape
    if tuple(down_proj.shape) != (e, h, two_i // 2):
        raise ValueError(f"down_proj must be [E={e}, H={h}, I={two_i // 2}]; got {tuple(down_proj.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.dtype.is_floating_point:
        raise ValueError(
            f"topk_ids must be an integer [N={n}, K] tensor; got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must match topk_ids {tuple(topk_ids.shape)}; got {tuple(topk_weights.shape)}"
        )
