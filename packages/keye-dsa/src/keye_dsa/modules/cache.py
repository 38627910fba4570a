"""Decode cache for ``DSAttention``: per layer, the K and V the decoder attends to and the indexer's keys."""

from __future__ import annotations

import torch


def append_rows(state: dict, name: str, x: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """``state[name]`` followed by ``x`` along dim 1 (rows), written into ``state[name + "_buffer"]``.

    The buffer holds ``capacity`` rows, and past them grows by an eighth, so a decode step copies only
    its own rows: a concatenation copies the whole cache every token (at 128K, more bytes than DSA's
    decode step reads). ``state[name]`` becomes a view of the filled rows, and that view is returned
    when grad mode is off (decoding); with it on, the concatenation is returned instead, so that the
    gradient reaches ``x`` and tensors saved for backward are never modified by a later append.
    """
    prev = state.get(name)
    n = 0 if prev is None else prev.shape[1]
    if prev is not None and (prev.shape[0] != x.shape[0] or prev.shape[2:] != x.shape[2:]):
        raise ValueError(
            f"cannot append {name} of shape {tuple(x.shape)} to the cached {tuple(prev.shape)}: batch and "
            "trailing dims must match (start a new cache for a new batch)"
        )
    end = n + x.shape[1]
    buf = state.get(name + "_buffer")
    stale = prev is None or buf is None or prev.data_ptr() != buf.data_ptr()  # set elsewhere: not our buffer
    if stale or buf.shape[1] < end or buf.dtype != x.dtype:
        rows = capacity if end <= capacity else n + max(x.shape[1], 256, n // 8)
        buf = x.new_empty(x.shape[0], rows, *x.shape[2:])
        if n:
            buf[:, :n] = prev
        state[name + "_buffer"] = buf
    buf[:, n:end] = x.detach()
    state[name] = buf[:, :end]
    if torch.is_grad_enabled():  # autograd may save what we return: never a buffer later writes bump
        return x if prev is None else torch.cat([prev, x], 1)
    return state[name]


class DSACache:
    """Grows by appending each forward's keys; chunked prefill is a sequence of forwards on one cache.

    ``index_dtype=torch.float8_e4m3fn`` keeps the indexer's keys in FP8 with one fp32 scale per key: a
    decode step then streams half the bytes through the indexer. An inference option: the indexer scores
    the quantized keys (the index sets can differ from bf16 keys' near the threshold), and its KL loss,
    if computed with this cache, gets no gradient into the index keys.
    """

    def __init__(self, index_dtype: torch.dtype | None = None, capacity: int = 0) -> None:
        if index_dtype not in (None, torch.float8_e4m3fn):
            raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn; got {index_dtype}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 tokens; got {capacity}")
        self.index_dtype = index_dtype
        self.capacity = capacity  # tokens to reserve up front (prompt + new tokens: no regrowth)
        self.layers: dict[int, dict] = {}

    def layer(self, layer_idx: int) -> dict:
        """The mutable state of one layer: ``"k"``, ``"v"`` ``[B,S,Hkv,D]``, ``"k_index"`` ``[B,S,DI]``
        (with FP8, ``"k_index_scale"`` ``[B,S]`` too), views of their growing buffers, the
        ``"index_dtype"`` it keeps them in and the ``"capacity"`` it reserves."""
        return self.layers.setdefault(layer_idx, {"index_dtype": self.index_dtype, "capacity": self.capacity})

    def append_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.layer(layer_idx)
        return append_rows(state, "k", k, self.capacity), append_rows(state, "v", v, self.capacity)

    def seq_len(self, layer_idx: int = 0) -> int:
        state = self.layers.get(layer_idx, {})
        return state["k"].shape[1] if "k" in state else 0
