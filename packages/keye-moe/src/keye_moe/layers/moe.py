"""The feed-forward blocks: routed SwiGLU experts (Qwen3-MoE) and the dense SwiGLU MLP.

Expert weights are stored stacked, as transformers v5 does (``gate_up_proj [E, 2I, H]`` with the gate
rows first, ``down_proj [E, H, I]``); the per-expert checkpoint names are mapped onto them by
``keye_moe.checkpoint``. The computation is delegated to an expert backend from the
``keye_expert_backends`` hook, chosen by ``DecoderConfig.expert_implementation``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from keye_moe.hookspecs import ExpertBackend
from keye_moe.layers.router import Router, RouterStats

AUTO_TRITON_MIN_ROWS = 8192  # token-expert pairs from which the tuned Triton kernels beat grouped_mm


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def resolve_expert_implementation(name: str, device: torch.device, dtype: torch.dtype, rows: int = 0) -> str:
    """``auto`` on Hopper-class CUDA in bf16/fp16: the Triton kernels for training and prefill batches
    (measured faster than grouped_mm at the 30B-A3B shape, BENCHMARKS.md), grouped_mm for decoding;
    grouped_mm on the CPU; the loop elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        hopper = _capability(device.index)[0] >= 9 and dtype in (torch.bfloat16, torch.float16)
        if hopper and rows >= AUTO_TRITON_MIN_ROWS:
            return "triton"
        return "grouped_mm" if hopper and hasattr(F, "grouped_mm") else "loop"
    return "grouped_mm" if device.type == "cpu" and hasattr(F, "grouped_mm") else "loop"


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, backend: ExpertBackend
    ) -> torch.Tensor:
        return backend(x, topk_ids, topk_weights, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Any, expert_backends: dict[str, ExpertBackend]):
        super().__init__()
        self.gate = Router(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.norm_topk_prob,
            config.expert_bias,
        )
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.implementation = config.expert_implementation
        self._backends = expert_backends  # shared, name -> backend instance, filled lazily by the model

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, need_stats: bool = True
    ) -> tuple[torch.Tensor, RouterStats | None]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_ids, topk_weights, stats = self.gate(flat, token_mask, need_stats)
        name = resolve_expert_implementation(self.implementation, x.device, x.dtype, topk_ids.numel())
        out = self.experts(flat, topk_ids, topk_weights, self._backends[name])
        return out.reshape(shape), stats


class DenseMLP(nn.Module):
    """SwiGLU MLP for the layers a config lists in ``mlp_only_layers``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
