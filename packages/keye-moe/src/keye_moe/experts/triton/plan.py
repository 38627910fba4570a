"""Padded dispatch for the Triton kernels, built on the device without a host sync.

Each expert's rows are padded up to a multiple of ``block_m`` so that every row block belongs to exactly
one expert. ``row_slot[p]`` is the flat (token * K + k) slot stored at padded row p, or -1 for padding;
``block_expert[b]`` is the expert of row block b, or E for the unused tail blocks (the grid is sized by
the upper bound ``cdiv(N*K, block_m) + E`` so its size never depends on the routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keye_moe.experts.routing import expert_counts


@dataclass
class Plan:
    row_slot: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [num_blocks] int32
    expert_start: torch.Tensor  # [E] int32: first padded row of each expert
    counts: torch.Tensor  # [E] int32: real rows of each expert
    block_m: int
    num_blocks: int
    top_k: int


def make_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Plan:
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    sorted_start = torch.cumsum(counts, 0) - counts
    expert_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - sorted_start[expert_sorted]
    dest = padded_start[expert_sorted] + rank
    num_blocks = triton_cdiv(n * k, block_m) + num_experts
    row_slot = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=flat.device)
    row_slot[dest] = order.to(torch.int32)
    block_first_row = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_first_row, right=True).to(torch.int32)
    return Plan(
        row_slot=row_slot,
        block_expert=block_expert,
        expert_start=padded_start.to(torch.int32),
        counts=counts.to(torch.int32),
        block_m=block_m,
        num_blocks=num_blocks,
        top_k=k,
    )


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
