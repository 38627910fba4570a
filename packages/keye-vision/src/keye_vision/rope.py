"""2-D rotary embedding of the Keye ViT: half of each head's rotary pairs follow the row, half the column.

Frequencies ``theta^(-2i/(head_dim/2))`` for i < head_dim/4; the angle vector of a patch is
``[row * f, col * f]`` repeated twice (rotate-half layout), as in the released Keye-VL-1.5 tower.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[tokens, 1, head_dim]`` (broadcast over heads)."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=rows.device) / dim))
    freqs = torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[..., heads, head_dim]``) in fp32 and return it in its own dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
