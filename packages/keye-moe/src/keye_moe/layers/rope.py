"""Rotary position embeddings: 1-D RoPE and M-RoPE (3-D positions), neox (rotate-half) style.

M-RoPE splits the ``head_dim // 2`` frequencies among the temporal, height and width position rows.
Two layouts exist in released models: Qwen2-VL / Keye-VL-1.5 give each row one contiguous chunk
(``mrope_section`` = [t, h, w] counts); Qwen3-VL interleaves them (frequency j uses row h when
``j % 3 == 1`` and ``j < 3 * h_count``, row w likewise for ``j % 3 == 2``, row t otherwise). When the
three rows are equal both reduce to 1-D RoPE exactly.

Context extension rescales the frequencies (``rope_scaling``, DESIGN §5's config): ``linear`` divides
them all by ``factor``; ``llama3`` divides only the low frequencies, blending across a middle band;
``yarn`` interpolates low frequencies, keeps high ones and ramps between (its band is set by
``beta_fast`` / ``beta_slow`` rotations over ``original_max_position_embeddings``), and multiplies cos
and sin by an attention factor. The formulas and fp32 operation order follow transformers'
``modeling_rope_utils``, so cos and sin equal transformers' bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_SCALING_KEYS: dict[str, tuple[set[str], set[str]]] = {  # type -> (required, optional) keys
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by: YaRN's ``0.1 ln(factor) + 1`` (or its mscale ratio, or the
    given ``attention_factor``); 1 for the other kinds."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn(theta_powers: torch.Tensor, dim: int, theta: float, p: dict[str, Any]) -> torch.Tensor:
    factor = p["factor"]

    def band_edge(rotations: float) -> float:  # the dim index that turns `rotations` times over the context
        context = p["original_max_position_embeddings"]
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = band_edge(p.get("beta_fast") or 32), band_edge(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width band would divide by zero
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=theta_powers.device) - low) / (high - low)
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (high frequencies), 0: interpolate
    return 1.0 / (factor * theta_powers) * (1 - keep) + 1.0 / theta_powers * keep


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    context = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low_f, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low_f) / (high_f - low_f)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = ~(wavelen < context / high_f) * ~(wavelen > context / low_f)
    return torch.where(middle, blended, scaled)


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """fp32 inverse frequencies ``[head_dim // 2]``, scaled as ``scaling`` says."""
    theta_powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim)
    kind = scaling["rope_type"] if scaling is not None else "default"
    if kind == "yarn":
        return _yarn(theta_powers, head_dim, theta, scaling)  # type: ignore[arg-type]
    inv_freq = 1.0 / theta_powers
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]  # type: ignore[index]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)  # type: ignore[arg-type]
    raise ValueError(f"rope_scaling rope_type {kind!r} is not one of {sorted(ROPE_SCALING_KEYS)}")


class RotaryEmbedding(nn.Module):
    """Turns position ids ``[B, T]`` or ``[3, B, T]`` into (cos, sin) ``[B, T, head_dim]``."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        mrope_section: list[int] | None = None,
        mrope_interleaved: bool = False,
        scaling: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        self.mrope_interleaved = mrope_interleaved
        self.scaling = dict(scaling) if scaling is not None else None
        self.attention_factor = rope_attention_factor(self.scaling)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """fp32 inverse frequencies, kept out of the state dict: no dtype cast or meta build touches them."""
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_frequencies(self.head_dim, self.theta, self.scaling, device)
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
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by (cos, sin) ``[B, T, D]``."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin
