"""``select_topk_decode``: top-k against a preallocated index-key cache, replayable by a CUDA graph.

Why a second entry point: ``select_topk`` reads the cache length off ``k_index.shape``, so every decode
step brings new shapes and new host-side sizes, and a CUDA graph captured at one step cannot replay the
next. Here the cache keeps its capacity and each row's filled length is a device tensor: the launches
have fixed shapes and the kernels read the lengths on the device (keys past a row's length are never
scored), so a whole decode step (indexer, top-k, sparse attention) is captured once and replayed for
every new token. Launch overhead, not the GPU, is what a decode step at batch 8 otherwise spends its
time on.
"""

from __future__ import annotations

import torch

from keye_dsa._checks import check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.indexer_topk import _check_index_inputs
from keye_dsa.ops.indexer_topk.reference import all_visible, select_topk_reference


def select_topk_decode(
    q_index: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    lengths: torch.Tensor,
    *,
    key_start: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Exact top-``topk`` cache positions for the ``T`` newest tokens of each row, int32 ``[B,T,topk]``.

    ``q_index [B,T,H,D]``, ``weights [B,T,H]``: the new tokens, which are the last ``T`` of the
    ``lengths[b]`` filled entries of ``k_cache [B,C,D]`` (capacity ``C``); ``key_start [B]`` hides left
    padding. The result equals ``select_topk(q_index, k_cache[b:b+1, :lengths[b]], ...)`` row by row.
    ``validate=False`` skips the range check of ``lengths`` (a device sync; not allowed while capturing).
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int; got {topk!r}")
    _check_index_inputs(q_index, k_cache, weights, packed=False)
    batch, t = q_index.shape[:2]
    capacity = k_cache.shape[1]
    check_rank("lengths", lengths, 1, "[batch]")
    check_same("lengths.shape[0]", lengths.shape[0], "batch", batch)
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64; got {lengths.dtype}")
    if key_start is not None:
        check_rank("key_start", key_start, 1, "[batch]")
        check_same("key_start.shape[0]", key_start.shape[0], "batch", batch)
    if validate and bool(((lengths < t) | (lengths > capacity)).any()):
        raise ValueError(
            f"lengths must lie in [{t}, {capacity}] (the new tokens are in the cache of capacity "
            f"{capacity}); "
            f"got {lengths.tolist()}"
        )
    if capacity <= topk:
        return all_visible(batch, t, lengths, topk, key_start, q_index.device)
    if impl_for(q_index, k_cache, weights, lengths) != "triton" or q_index.dtype == torch.float64:
        return _reference_rows(q_index, k_cache, weights, topk, lengths, key_start)
    from keye_dsa.ops.indexer_topk.triton_kernel import topk_chunk

    dev = q_index.device
    lengths = lengths.to(device=dev, dtype=torch.int32)
    hi = lengths[:, None] - t + torch.arange(t, dtype=torch.int32, device=dev)[None, :]
    lo = torch.zeros_like(hi) if key_start is None else key_start.to(dev, torch.int32)[:, None].expand_as(hi)
    out = torch.empty(batch, t, topk, dtype=torch.int32, device=dev)
    q_index, k_cache, weights = (x.contiguous() for x in (q_index, k_cache, weights))
    topk_chunk(q_index, k_cache, weights, lo.contiguous(), hi, torch.zeros_like(hi), out, 0, capacity)
    return out


def _reference_rows(q, k, w, topk, lengths, key_start) -> torch.Tensor:
    """Row by row on the filled part of the cache: the plain-PyTorch ground truth."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        start = None if key_start is None else key_start[b : b + 1]
        rows.append(
            select_topk_reference(q[b : b + 1], k[b : b + 1, :n], w[b : b + 1], topk, key_start=start)
        )
    return torch.cat(rows)
