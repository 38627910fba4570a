"""Decode cache for ``DSAttention``: per layer, the K and V the decoder attends to and the indexer's keys."""

from __future__ import annotations

import torch


class DSACache:
    """Grows by appending each forward's keys; chunked prefill is a sequence of forwards on one cache.

    ``index_dtype=torch.float8_e4m3fn`` keeps the indexer's keys in FP8 with one fp32 scale per key: a
    decode step then streams half the bytes through the indexer. An inference option: the indexer scores
    the quantized keys (the index sets can differ from bf16 keys' near the threshold), and its KL loss,
    if computed with this cache, gets no gradient into the index keys.
    """

    def __init__(self, index_dtype: torch.dtype | None = None) -> None:
        if index_dtype not in (None, torch.float8_e4m3fn):
            raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn; got {index_dtype}")
        self.index_dtype = index_dtype
        self.layers: dict[int, dict] = {}

    def layer(self, layer_idx: int) -> dict:
        """The mutable state of one layer: ``"k"``, ``"v"`` ``[B,S,Hkv,D]``, ``"k_index"`` ``[B,S,DI]``
        (with FP8, ``"k_index_scale"`` ``[B,S]`` too) and the ``"index_dtype"`` it keeps them in."""
        return self.layers.setdefault(layer_idx, {"index_dtype": self.index_dtype})

    def append_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.layer(layer_idx)
        if "k" in state:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        state["k"], state["v"] = k.detach(), v.detach()
        return k, v

    def seq_len(self, layer_idx: int = 0) -> int:
        state = self.layers.get(layer_idx, {})
        return state["k"].shape[1] if "k" in state else 0
