"""Decode cache for ``DSAttention``: per layer, the K and V the decoder attends to and the indexer's keys."""

from __future__ import annotations

import torch


class DSACache:
    """Grows by appending each forward's keys; chunked prefill is a sequence of forwards on one cache."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The mutable state of one layer: ``"k"``, ``"v"`` ``[B,S,Hkv,D]`` and ``"k_index"`` ``[B,S,DI]``."""
        return self.layers.setdefault(layer_idx, {})

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
