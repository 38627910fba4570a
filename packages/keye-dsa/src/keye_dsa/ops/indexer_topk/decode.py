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
    k_scale: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Exact top-``topk`` cache positions for the ``T`` newest tokens of each row, int32 ``[B,T,topk]``.

    ``q_index [B,T,H,D]``, ``weights [B,T,H]``: the new tokens, which are the last ``T`` of the
    ``lengths[b]`` filled entries of ``k_cache [B,C,D]`` (capacity ``C``); ``key_start [B]`` hides left
    padding. The result equals ``select_topk(q_index, k_cache[b:b+1, :lengths[b]], ...)`` row by row, as
    a set (the order of the positions is unspecified). An FP8 cache (``torch.float8_e4m3fn``, e.g. from
    ``quantize_index_keys``) comes with its per-key fp32 ``k_scale [B,C]``; the keys are then
    ``k_cache.float() * k_scale[..., None]``. ``validate=False`` skips the range check of ``lengths`` (a
    device sync; not allowed while capturing).
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int; got {topk!r}")
    _check_index_inputs(q_index, _key_shape(k_cache, k_scale, q_index.dtype), weights, packed=False)
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
        keys = (
            k_cache
            if k_scale is None
            else dequantize_index_keys(k_cache, k_scale, torch.promote_types(q_index.dtype, torch.float32))
        )
        return _reference_rows(q_index, keys, weights, topk, lengths, key_start)
    dev = q_index.device
    lengths = lengths.to(device=dev, dtype=torch.int32).contiguous()  # the kernels index it by row
    q_index, k_cache, weights = (x.contiguous() for x in (q_index, k_cache, weights))
    from keye_dsa.ops.indexer_topk.decode_kernel import decode_topk

    start = None if key_start is None else key_start.to(device=dev, dtype=torch.int32).contiguous()
    scale = None if k_scale is None else k_scale.to(device=dev, dtype=torch.float32).contiguous()
    return decode_topk(q_index, k_cache, weights, lengths, start, topk, scale)


def quantize_index_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k [..., D]`` -> FP8 e4m3 keys and their per-key fp32 scale (``amax / 448``): half the bytes a
    decode step streams. Index keys are LayerNorm-ed (and optionally Hadamard-rotated, which spreads
    outliers over the dimensions), so one scale per key loses little."""
    amax = k.float().abs().amax(-1).clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (k.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_index_keys(k_fp8: torch.Tensor, k_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The keys an FP8 cache stands for: ``k_fp8.float() * k_scale[..., None]`` (then cast to ``dtype``)."""
    return (k_fp8.float() * k_scale.float()[..., None]).to(dtype)


def _key_shape(k_cache: torch.Tensor, k_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``k_cache`` for the shared checks; an FP8 cache is checked against its scale and stood in for by a
    shape-only tensor of the query dtype."""
    if k_scale is None:
        return k_cache
    if k_cache.dtype != torch.float8_e4m3fn:
        raise TypeError(f"k_cache must be torch.float8_e4m3fn when k_scale is given; got {k_cache.dtype}")
    check_rank("k_cache", k_cache, 3, "[batch, capacity, index_dim]")
    check_same("k_scale.shape", tuple(k_scale.shape), "k_cache.shape[:2]", tuple(k_cache.shape[:2]))  # type: ignore[arg-type]
    return torch.empty(k_cache.shape, dtype=dtype, device="meta")


def _reference_rows(q, k, w, topk, lengths, key_start) -> torch.Tensor:
    """Row by row on the filled part of the cache: the plain-PyTorch ground truth."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        start = None if key_start is None else key_start[b : b + 1]
        rows.append(
            select_topk_reference(q[b : b + 1], k[b : b + 1, :n], w[b : b + 1], topk, key_start=start)
        )
    return torch.cat(rows)
