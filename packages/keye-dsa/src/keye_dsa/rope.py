"""Rotary embeddings for the indexer: neox-style RoPE, or M-RoPE over the full index dim (DESIGN §4).

M-RoPE splits the ``dim / 2`` rotary frequencies into temporal / height / width sections, each rotated
by its own row of ``position_ids [3, B, T]``. The decoder's ``mrope_section`` is given for its
``head_dim``; the indexer rotates all of ``D_I``, so the sections are scaled by ``D_I / head_dim``.
"""

from __future__ import annotations

import itertools

import torch


def scale_sections(mrope_section: list[int], index_dim: int, head_dim: int) -> list[int]:
    """Scale the decoder's sections to ``index_dim`` so they still cover ``index_dim / 2`` frequencies."""
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
    scaled = [s * index_dim // head_dim for s in mrope_section]
    scaled[-1] += index_dim // 2 - sum(scaled)
    if min(scaled) < 0:
        raise ValueError(
            f"cannot scale mrope_section {mrope_section} from head_dim {head_dim} to {index_dim}"
        )
    return scaled


def rope_cos_sin(
    position_ids: torch.Tensor,
    dim: int,
    theta: float,
    sections: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, T, dim]`` for ``position_ids [B, T]`` or M-RoPE ``[3, B, T]`` (needs ``sections``)."""
    check_positions(position_ids, dim, sections)
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
    if position_ids.dim() == 2:
        freqs = position_ids.double()[..., None] * inv_freq
    else:
        # each frequency's axis (0, 1, 2), from host ints only: no host-to-device copy (CUDA graphs)
        bounds = itertools.accumulate(sections[:2])
        freq = torch.arange(dim // 2, device=device)
        axis = sum((freq >= b).long() for b in bounds)
        all_freqs = position_ids.double()[..., None] * inv_freq  # [3, B, T, dim/2]
        freqs = all_freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *all_freqs.shape[1:]))[0]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check_positions(position_ids: torch.Tensor, dim: int, sections: list[int] | None) -> None:
    """``position_ids`` must be ``[B, T]``, or ``[3, B, T]`` with 3 sections covering ``dim / 2``."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even; got {dim}")
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        if sections is None or len(sections) != 3 or sum(sections) != dim // 2:
            raise ValueError(
                f"3-D (M-RoPE) position_ids need 3 mrope sections summing to {dim // 2}; got {sections}"
            )
    elif position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T] or [3, B, T]; got shape {tuple(position_ids.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of ``x [B, T, (H,) D]`` by ``cos, sin [B, T, D]``."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
