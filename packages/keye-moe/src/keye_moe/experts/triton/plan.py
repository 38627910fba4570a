"""Padded dispatch for the Triton kernels, built on the device by three small kernels, without a host sync.

Each expert's rows are padded up to a multiple of ``block_m`` so that every row block belongs to exactly
one expert. ``row_slot[p]`` is the flat (token * K + k) slot stored at padded row p, or -1 for padding;
``block_expert[b]`` is the expert of row block b, or E for the unused tail blocks (buffers are sized by
the upper bound ``cdiv(N*K, block_m) + E`` so their size never depends on the routing);
``used_blocks[0]`` is the number of blocks before that tail, which the persistent GEMMs loop up to.

The slots are cut into small chunks: ``_count_kernel`` takes each chunk's expert histogram,
``_scan_kernel`` (a program per expert) the slots of that expert in earlier chunks, and ``_place_kernel``
gives every slot its padded row (expert start + that prefix + its rank among the chunk's slots of its
expert). Slots keep their flat order inside an expert, as a stable argsort would, so the plan (and the
weight-gradient summation order) is deterministic. ``reference_plan`` is the same plan in plain PyTorch
(argsort, searchsorted), which the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from keye_moe.experts.routing import expert_counts

CHUNK_ELEMENTS = 8192  # slots x experts per placement program (a one-hot [chunk, E] rank in registers)


@dataclass
class Plan:
    row_slot: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [num_blocks] int32
    expert_start: torch.Tensor  # [E] int32: first padded row of each expert
    counts: torch.Tensor  # [E] int32: real rows of each expert
    used_blocks: torch.Tensor  # [1] int32: row blocks that belong to an expert (the rest are tail)
    block_m: int
    num_blocks: int
    top_k: int


@triton.jit
def _count_kernel(ids_ptr, hist_ptr, S, E, P, CHUNK: tl.constexpr, BINS: tl.constexpr):
    """Chunk p's expert histogram, stored transposed (``hist[e, p]``) for the per-expert scan."""
    p = tl.program_id(0)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=0).to(tl.int32)
    hist = tl.histogram(ids, BINS, mask=offs < S)
    bins = tl.arange(0, BINS)
    tl.store(hist_ptr + bins * P + p, hist, mask=bins < E)


@triton.jit
def _scan_kernel(hist_ptr, base_ptr, counts_ptr, P, TILE: tl.constexpr):
    """Expert e (one program each): slots in earlier chunks (exclusive prefix over p) and the total."""
    e = tl.program_id(0)
    running = tl.zeros([], dtype=tl.int32)
    for p0 in range(0, P, TILE):
        p = p0 + tl.arange(0, TILE)
        h = tl.load(hist_ptr + e * P + p, mask=p < P, other=0)
        tl.store(base_ptr + e * P + p, running + tl.cumsum(h, 0) - h, mask=p < P)
        running += tl.sum(h, 0)
    tl.store(counts_ptr + e, running)


@triton.jit
def _place_kernel(
    ids_ptr,
    base_ptr,
    counts_ptr,
    row_slot_ptr,
    block_expert_ptr,
    expert_start_ptr,
    used_blocks_ptr,
    S,
    E,
    P,
    NUM_BLOCKS,
    BLOCKS_PER_PROGRAM,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
):
    """Each slot of chunk p goes to its expert's padded start + slots of that expert in earlier chunks +
    its stable rank inside the chunk. Each program also labels a few row blocks with their expert and
    writes -1 to their padding rows (disjoint from every real row, so the order of stores is free)."""
    p = tl.program_id(0)
    bins = tl.arange(0, BINS)
    e_mask = bins < E
    counts = tl.load(counts_ptr + bins, mask=e_mask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    if p == 0:
        tl.store(expert_start_ptr + bins, start, mask=e_mask)
        tl.store(used_blocks_ptr, tl.sum(padded, 0) // BLOCK_M)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    valid = offs < S
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    onehot = (ids[:, None] == bins[None, :]).to(tl.int32)
    rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1 + start[None, :]), 1)
    before = tl.load(base_ptr + ids * P + p, mask=valid, other=0)
    tl.store(row_slot_ptr + before + rank, offs.to(tl.int32), mask=valid)
    end_real = tl.where(e_mask, end, 2147483647)
    filled = start + counts  # end of each expert's real rows
    for b in range(p * BLOCKS_PER_PROGRAM, tl.minimum((p + 1) * BLOCKS_PER_PROGRAM, NUM_BLOCKS)):
        expert = tl.sum((end_real <= b * BLOCK_M).to(tl.int32), 0)  # experts ending at or before block b
        tl.store(block_expert_ptr + b, expert)
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)  # the padding rows (all rows of a tail block) get -1
        real_end = tl.sum(tl.where(bins == expert, filled, 0), 0)
        tl.store(row_slot_ptr + rows, tl.full([BLOCK_M], -1, tl.int32), mask=rows >= real_end)


def make_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Plan:
    n, k = topk_ids.shape
    slots = n * k
    flat = topk_ids.reshape(-1)
    bins = triton.next_power_of_2(num_experts)
    chunk = max(16, min(CHUNK_ELEMENTS // bins, 128))
    chunks = triton.cdiv(slots, chunk)
    num_blocks = triton.cdiv(slots, block_m) + num_experts
    dev = flat.device
    hist = torch.empty(num_experts, chunks, dtype=torch.int32, device=dev)
    base = torch.empty_like(hist)
    row_slot = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    used_blocks = torch.empty(1, dtype=torch.int32, device=dev)
    _count_kernel[(chunks,)](flat, hist, slots, num_experts, chunks, CHUNK=chunk, BINS=bins)
    _scan_kernel[(num_experts,)](hist, base, counts, chunks, TILE=1024)
    _place_kernel[(chunks,)](
        flat, base, counts, row_slot, block_expert, expert_start, used_blocks, slots, num_experts, chunks,
        num_blocks, triton.cdiv(num_blocks, chunks), BLOCK_M=block_m, CHUNK=chunk, BINS=bins,
    )  # fmt: skip
    return Plan(row_slot, block_expert, expert_start, counts, used_blocks, block_m, num_blocks, k)


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
    used_blocks = (padded.sum() // block_m).to(torch.int32).reshape(1)
    return Plan(
        row_slot,
        block_expert,
        padded_start.to(torch.int32),
        counts.to(torch.int32),
        used_blocks,
        block_m,
        num_blocks,
        k,
    )
