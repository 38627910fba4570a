"""Padded dispatch for the Triton kernels, built on the device by two small kernels, without a host sync.

Each expert's rows are padded up to a multiple of ``block_m`` so that every row block belongs to exactly
one expert. ``row_slot[p]`` is the flat (token * K + k) slot stored at padded row p, or -1 for padding;
``block_expert[b]`` is the expert of row block b, or E for the unused tail blocks (the grid is sized by
the upper bound ``cdiv(N*K, block_m) + E`` so its size never depends on the routing).

The slots are cut into chunks: ``_count_kernel`` takes each chunk's expert histogram, ``_place_kernel``
gives every slot its padded row (expert start + slots of that expert in earlier chunks + rank inside
the chunk). Slots keep their flat order inside an expert, as a stable argsort would, so the plan (and
the weight-gradient summation order) is deterministic. ``reference_plan`` is the same plan in plain
PyTorch (argsort, searchsorted), which the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from keye_moe.experts.routing import expert_counts

MAX_CHUNKS = 256  # chunks per plan: bounds the per-chunk prefix sums each program recomputes


@dataclass
class Plan:
    row_slot: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [num_blocks] int32
    expert_start: torch.Tensor  # [E] int32: first padded row of each expert
    counts: torch.Tensor  # [E] int32: real rows of each expert
    block_m: int
    num_blocks: int
    top_k: int


@triton.jit
def _count_kernel(ids_ptr, hist_ptr, S, E, CHUNK: tl.constexpr, BINS: tl.constexpr):
    p = tl.program_id(0)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=0).to(tl.int32)
    hist = tl.histogram(ids, BINS, mask=offs < S)
    bins = tl.arange(0, BINS)
    tl.store(hist_ptr + p * E + bins, hist, mask=bins < E)


@triton.jit
def _place_kernel(
    ids_ptr,
    hist_ptr,
    row_slot_ptr,
    block_expert_ptr,
    expert_start_ptr,
    counts_ptr,
    S,
    E,
    P,
    NUM_BLOCKS,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    SUB: tl.constexpr,
):
    p = tl.program_id(0)
    bins = tl.arange(0, BINS)
    e_mask = bins < E
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for q0 in range(0, P, 16):  # every chunk's histogram: the totals and this chunk's exclusive prefix
        q = q0 + tl.arange(0, 16)
        h = tl.load(
            hist_ptr + q[:, None] * E + bins[None, :], mask=(q < P)[:, None] & e_mask[None, :], other=0
        )
        total += tl.sum(h, 0)
        before += tl.sum(tl.where((q < p)[:, None], h, 0), 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    if p == 0:
        tl.store(expert_start_ptr + bins, start, mask=e_mask)
        tl.store(counts_ptr + bins, total, mask=e_mask)
        end_real = tl.where(e_mask, end, 2147483647)
        for b0 in range(0, NUM_BLOCKS, 64):  # expert of a block = number of experts ending at or before it
            blk = b0 + tl.arange(0, 64)
            first = blk * BLOCK_M
            expert = tl.sum((end_real[None, :] <= first[:, None]).to(tl.int32), 1)
            tl.store(block_expert_ptr + blk, expert, mask=blk < NUM_BLOCKS)
    running = start + before  # next free padded row of each expert for this chunk
    for s0 in range(0, CHUNK, SUB):
        offs = p * CHUNK + s0 + tl.arange(0, SUB)
        valid = offs < S
        ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
        onehot = (ids[:, None] == bins[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - 1 + running[None, :]  # stable rank of each slot in its expert
        dest = tl.sum(onehot * rank, 1)
        tl.store(row_slot_ptr + dest, offs.to(tl.int32), mask=valid)
        running += tl.sum(onehot, 0)


def make_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Plan:
    n, k = topk_ids.shape
    slots = n * k
    flat = topk_ids.reshape(-1)
    chunk = max(1024, triton.next_power_of_2(triton.cdiv(slots, MAX_CHUNKS)))
    chunks = triton.cdiv(slots, chunk)
    bins = triton.next_power_of_2(num_experts)
    num_blocks = triton.cdiv(slots, block_m) + num_experts
    dev = flat.device
    hist = torch.empty(chunks, num_experts, dtype=torch.int32, device=dev)
    row_slot = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    _count_kernel[(chunks,)](flat, hist, slots, num_experts, CHUNK=chunk, BINS=bins)
    _place_kernel[(chunks,)](
        flat, hist, row_slot, block_expert, expert_start, counts, slots, num_experts, chunks, num_blocks,
        BLOCK_M=block_m, CHUNK=chunk, BINS=bins, SUB=max(16, min(64, 4096 // bins)),
    )  # fmt: skip
    return Plan(row_slot, block_expert, expert_start, counts, block_m, num_blocks, k)


def reference_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Plan:
    """The same plan from PyTorch ops (a stable argsort of the slots by expert)."""
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
    num_blocks = triton.cdiv(n * k, block_m) + num_experts
    row_slot = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=flat.device)
    row_slot[padded_start[expert_sorted] + rank] = order.to(torch.int32)
    block_first_row = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_first_row, right=True).to(torch.int32)
    return Plan(
        row_slot, block_expert, padded_start.to(torch.int32), counts.to(torch.int32), block_m, num_blocks, k
    )
