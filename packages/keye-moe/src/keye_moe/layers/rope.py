"""Rotary position embeddings: 1-D RoPE and M-RoPE (3-D positions), neox (rotate-half) style.

M-RoPE splits the ``head_dim // 2`` frequencies among the temporal, height and width position rows.
Two layouts exist in released models: Qwen2-VL / Keye-VL-1.5 give each row one contiguous chunk
(``mrope_section`` = [t, h, w] counts); Qwen3-VL interleaves them (frequency j uses row h when
``j % 3 == 1`` and ``j < 3 * h_count``, row w likewise for ``j % 3 == 2``, row t otherwise). When the
three rows are equal both reduce to 1-D RoPE exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Turns position ids ``[B, T]`` or ``[3, B, T]`` into (cos, sin) ``[B, T, head_dim]``."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        mrope_section: list[int] | None = None,
        mrope_interleaved: bool = False,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        self.mrope_interleaved = mrope_interleaved
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """fp32 inverse frequencies, kept out of the state dict: no dtype cast or meta build touches them."""
        if device not in self._inv_freq:
            d = self.head_dim
            self._inv_freq[device] = 1.0 / (
                self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d)
            )
        return self._inv_freq[device]

    def freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Angles ``[B, T, head_dim // 2]`` in fp32."""
        inv = self.inv_freq(position_ids.device)
        if position_ids.dim() == 2:
            return position_ids[..., None].float() * inv
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [B, T] or [3, B, T]; got {tuple(position_ids.shape)}")
        per_row = position_ids[..., None].float() * inv  # [3, B, T, D/2]
        if self.mrope_section is None:
            raise ValueError("3-D position_ids (M-RoPE) need DecoderConfig.mrope_section")
        if self.mrope_interleaved:
            out = per_row[0].clone()
            for row, offset in ((1, 1), (2, 2)):
                idx = slice(offset, self.mrope_section[row] * 3, 3)
                out[..., idx] = per_row[row][..., idx]
            return out
        chunks = per_row.split(self.mrope_section, dim=-1)
        return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.freqs(position_ids)
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by (cos, sin) ``[B, T, D]``."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin
