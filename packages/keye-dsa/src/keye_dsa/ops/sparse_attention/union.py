"""Per-block union of selected keys, built on the GPU without a sort (the "union" sparse path's plan).

A trained indexer gives neighbouring queries overlapping index sets (issue 3's "structured" pattern: each
query's 2048 keys are its 512 newest plus 1536 from a pool shared by its block of 64). The union kernel
(``union_kernel.py``) then loads each shared K/V row once per block of ``QB = 64`` consecutive queries
instead of once per query. It needs, per block ``b``:

- ``U_b``: the union of the block's valid indices, ascending;
- ``M_b[u]``: a 64-bit membership mask, bit ``j`` set when query ``j`` of the block selected ``U_b[u]``.

Three passes build it. ``_mark``: every index sets its bit in a per-block bitmap over key positions
(``atomic_or``); the first ``PROBE`` queries of each block go first, and a block whose probe union already
exceeds the cap is not marked further (random selections: 1/8 of the atomics). ``_scan``: per block,
popcounts and a prefix sum over the bitmap words give each word's first rank, ``|U_b|``, and ``U_b``
itself (ascending by construction). ``_rank``: each index's rank is its word's first rank plus the set
bits below it; the query's bit is ``atomic_or``-ed into ``M_b[rank]``.

Blocks where the union would not pay off fall back to the per-query kernel (``use[b] = False``):
``|U_b| > cap`` (random indices give tens of thousands), or an index repeated within one query: the
reference counts a repeated slot twice, which a membership bit cannot express, so such blocks are not
rejected but computed exactly by the per-query kernel. ``_rank`` detects repeats for free: the old value
its ``atomic_or`` returns already holds the query's bit.

Memory: the bitmap and word ranks take ``2 * blocks * ceil(S / 32) * 4`` bytes while the plan is built
(256 MiB at T = S = 256K) and are freed after; the plan keeps ``blocks * cap * 12`` bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import popcount

QB = 64  # queries per block: one bit each in the 64-bit membership mask
QB_JIT = tl.constexpr(QB)  # the same, for @triton.jit code (which reads only constexpr globals)
UNION_CAP = 4096  # largest |U_b| taken by the union kernel (structured top-2048: about 2600)
PROBE = 8  # queries per block marked first: a union already over the cap stops the block's marking


@dataclass
class UnionPlan:
    """``keys [B*NB, cap]`` int32 (``U_b``, valid below ``count``), ``members [B*NB, cap]`` int64 (``M_b``),
    ``count [B*NB]`` int32 (``|U_b|`` when it fits the cap, else some number above the cap),
    ``use [B*NB]`` bool (block computed by the union kernel), ``blocks`` = NB."""

    keys: torch.Tensor
    members: torch.Tensor
    count: torch.Tensor
    use: torch.Tensor
    blocks: int

    @property
    def cap(self) -> int:
        return self.keys.shape[1]


@triton.jit
def _mark(IDX, BITMAP, COUNT, sib, sit, KTOP, NB, W, CAP, Q_LO, Q_HI, QB: tl.constexpr, BLOCK_K: tl.constexpr,
          AFTER_PROBE: tl.constexpr):  # fmt: skip
    """Sets the bits of the indices of queries ``Q_LO <= t % QB < Q_HI``; ``AFTER_PROBE``: only in blocks
    whose probe union (``COUNT``) still fits the cap."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    blk = b * NB + t // QB
    todo = (t % QB >= Q_LO) & (t % QB < Q_HI)
    if AFTER_PROBE:
        todo = todo & (tl.load(COUNT + blk) <= CAP)
    base = BITMAP + blk * W
    for k0 in range(0, tl.where(todo, KTOP, 0), BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * sib + t * sit + offs, mask=offs < KTOP, other=-1)
        ok = idx >= 0
        bit = tl.full([BLOCK_K], 1, tl.uint32) << (idx & 31).to(tl.uint32)
        tl.atomic_or(base + (idx >> 5), bit.to(tl.int32, bitcast=True), mask=ok, sem="relaxed")


@triton.jit
def _scan(BITMAP, WRANK, KEYS, COUNT, W, CAP, BLOCK_W: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, 32).to(tl.uint32)
    below_mask = (tl.full([32], 1, tl.uint32) << j) - 1
    carry = tl.zeros([], tl.int32)
    for w0 in range(0, W, BLOCK_W):
        offs = w0 + tl.arange(0, BLOCK_W)
        words = tl.load(BITMAP + blk * W + offs, mask=offs < W, other=0).to(tl.uint32, bitcast=True)
        pc = popcount(words)
        first = carry + tl.cumsum(pc, 0) - pc
        tl.store(WRANK + blk * W + offs, first, mask=offs < W)
        is_set = ((words[:, None] >> j[None, :]) & 1) != 0
        rank = first[:, None] + popcount(words[:, None] & below_mask[None, :])
        pos = offs[:, None] * 32 + j[None, :].to(tl.int32)
        tl.store(KEYS + blk * CAP + rank, pos, mask=is_set & (rank < CAP))
        carry += tl.sum(pc, 0)
    tl.store(COUNT + blk, carry)


@triton.jit
def _rank(
    IDX, BITMAP, WRANK, COUNT, MEMBERS, REPEAT, sib, sit, KTOP, NB, W, CAP,
    QB: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    blk = b * NB + t // QB
    fits = tl.load(COUNT + blk) <= CAP
    bit = tl.full([BLOCK_K], 1, tl.int64) << (t % QB)
    repeat = tl.zeros([], tl.int32)
    for k0 in range(0, tl.where(fits, KTOP, 0), BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * sib + t * sit + offs, mask=offs < KTOP, other=-1)
        ok = idx >= 0
        word_at = blk * W + (idx >> 5)
        word = tl.load(BITMAP + word_at, mask=ok, other=0).to(tl.uint32, bitcast=True)
        below = (tl.full([BLOCK_K], 1, tl.uint32) << (idx & 31).to(tl.uint32)) - 1
        rank = tl.load(WRANK + word_at, mask=ok, other=0) + popcount(word & below)
        old = tl.atomic_or(MEMBERS + blk * CAP + rank, bit, mask=ok, sem="relaxed")
        repeat = tl.maximum(repeat, tl.max(tl.where(ok & ((old & bit) != 0), 1, 0), 0))
    tl.atomic_max(REPEAT + blk, repeat, sem="relaxed")


def build_union_plan(indices: torch.Tensor, num_keys: int, cap: int | None = None) -> UnionPlan:
    """Union plan of ``indices [B, T, K]`` (int32, contiguous, values in ``[-1, num_keys)``)."""
    cap = UNION_CAP if cap is None else cap
    batch, t, ktop = indices.shape
    nb = triton.cdiv(t, QB)
    words = triton.cdiv(max(num_keys, 1), 32)
    dev = indices.device
    bitmap = torch.zeros(batch * nb, words, dtype=torch.int32, device=dev)
    wrank = torch.empty_like(bitmap)
    keys = torch.empty(batch * nb, cap, dtype=torch.int32, device=dev)
    members = torch.zeros(batch * nb, cap, dtype=torch.int64, device=dev)
    count = torch.empty(batch * nb, dtype=torch.int32, device=dev)
    repeat = torch.zeros(batch * nb, dtype=torch.int32, device=dev)
    if t > 0 and ktop > 0:
        block_k = min(1024, triton.next_power_of_2(ktop))
        si = (indices.stride(0), indices.stride(1))
        marks = (indices, bitmap, count, *si, ktop, nb, words, cap)
        # Probe: the union of a block's first PROBE queries; when it already exceeds the cap (random
        # selections), the block's other queries are never marked.
        _mark[(t, batch)](*marks, 0, PROBE, QB=QB, BLOCK_K=block_k, AFTER_PROBE=False)
        _scan[(batch * nb,)](bitmap, wrank, keys, count, words, cap, BLOCK_W=128)
        _mark[(t, batch)](*marks, PROBE, QB, QB=QB, BLOCK_K=block_k, AFTER_PROBE=True)
        _scan[(batch * nb,)](bitmap, wrank, keys, count, words, cap, BLOCK_W=128)
        _rank[(t, batch)](
            indices, bitmap, wrank, count, members, repeat, *si, ktop, nb, words, cap, QB=QB, BLOCK_K=block_k
        )  # fmt: skip
    else:
        count.zero_()
    use = (count <= cap) & (repeat == 0)
    return UnionPlan(keys, members, count, use, nb)


_PATHS = ("auto", "union", "per_query")


def plan_for(indices: torch.Tensor, num_keys: int) -> UnionPlan | None:
    """The plan the Triton sparse attention uses, or ``None`` for the per-query kernel alone.

    ``KEYE_DSA_SPARSE_PATH``: ``auto`` (default) builds a plan once there is a full block of 64 queries
    (decoding a few tokens would only pay its cost); ``union`` always builds one (tests; blocks over the
    cap or with repeated indices still fall back); ``per_query`` never does (debugging the union path).
    """
    path = os.environ.get("KEYE_DSA_SPARSE_PATH", "auto").lower()
    if path not in _PATHS:
        raise ValueError(f"KEYE_DSA_SPARSE_PATH must be one of {_PATHS}; got {path!r}")
    if path == "per_query" or (path == "auto" and indices.shape[1] < QB):
        return None
    return build_union_plan(indices, num_keys)


def union_plan_reference(indices: torch.Tensor, num_keys: int, cap: int | None = None) -> UnionPlan:
    """Plain PyTorch plan, block by block (tests compare ``build_union_plan`` with it)."""
    cap = UNION_CAP if cap is None else cap
    batch, t, _ = indices.shape
    nb = -(-t // QB)
    keys = torch.zeros(batch * nb, cap, dtype=torch.int32)
    members = torch.zeros(batch * nb, cap, dtype=torch.int64)
    count = torch.zeros(batch * nb, dtype=torch.int32)
    use = torch.zeros(batch * nb, dtype=torch.bool)
    for b in range(batch):
        for blk in range(nb):
            rows = indices[b, blk * QB : (blk + 1) * QB].long().cpu()
            union = torch.unique(rows[rows >= 0])  # sorted
            n = union.numel()
            i = b * nb + blk
            count[i] = n
            repeated = any(r[r >= 0].unique().numel() != int((r >= 0).sum()) for r in rows)
            use[i] = n <= cap and not repeated
            if n <= cap:
                keys[i, :n] = union.int()
                for j, r in enumerate(rows):
                    hit = torch.isin(union, r[r >= 0])
                    members[i, :n] |= hit.long() << j
    return UnionPlan(keys, members, count, use, nb)
