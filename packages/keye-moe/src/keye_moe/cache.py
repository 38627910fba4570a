"""The decoder's KV cache: preallocated per-layer K/V plus per-layer state that attention backends own.

The decoder owns K and V (DESIGN §2); a backend such as DSA keeps its own decode state (the index keys)
in ``backend_state[layer]``, a dict it fills as it likes. ``key_padding_mask`` marks left padding of
batched prompts; ``next_position`` is where each row's positions continue (after an M-RoPE prompt this
is past the largest position of any row, as Qwen2-VL's ``rope_deltas`` do).
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # a backend's per-layer dict, seeded with the capacity hint (DSA sizes its index-key buffer by it)
        self.backend_state: list[dict[str, Any]] = [{"capacity": capacity} for _ in range(num_layers)]
        self.key_padding_mask: torch.Tensor | None = None  # bool [B, length]; None: no padding anywhere
        self.next_position: torch.Tensor | None = None  # long [B]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``[B, T, Hkv, D]`` keys/values; return everything cached so far."""
        end = self.length + k.shape[1]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[1] < end or buf_k.shape[0] != k.shape[0]:
            cap = max(end, self.capacity, 2 * (buf_k.shape[1] if buf_k is not None else 0))
            new_k = k.new_empty(k.shape[0], cap, *k.shape[2:])
            new_v = v.new_empty(v.shape[0], cap, *v.shape[2:])
            if buf_k is not None and self.length:
                new_k[:, : self.length] = buf_k[:, : self.length]
                new_v[:, : self.length] = buf_v[:, : self.length]  # type: ignore[index]
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v = new_k, new_v
        buf_k[:, self.length : end] = k
        buf_v[:, self.length : end] = v  # type: ignore[index]
        return buf_k[:, :end], buf_v[:, :end]  # type: ignore[index]

    def extend_padding(
        self, new_mask: torch.Tensor | None, batch: int, steps: int, device: torch.device
    ) -> None:
        """Record which of the next ``steps`` keys are real (None: all)."""
        if self.key_padding_mask is None and (new_mask is None or bool(new_mask.all())):
            return
        if new_mask is None:
            new_mask = torch.ones(batch, steps, dtype=torch.bool, device=device)
        if self.key_padding_mask is None:
            self.key_padding_mask = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        self.key_padding_mask = torch.cat([self.key_padding_mask, new_mask.to(torch.bool)], dim=1)

    def advance(self, steps: int, positions: torch.Tensor) -> None:
        """Called by the model once all layers have appended ``steps`` tokens with these positions."""
        self.length += steps
        pos = positions if positions.dim() == 2 else positions.amax(0)
        self.next_position = pos.amax(-1) + 1
