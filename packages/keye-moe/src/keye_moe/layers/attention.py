"""GQA self-attention with q/k RMSNorm and (M-)RoPE; the attention op itself comes from a backend.

The decoder owns the projections, the norms, the rotary embedding and the K/V cache; a backend (``sdpa``
built in, ``dsa`` from keye-dsa, ...) receives q, k, v after RoPE plus an ``AttentionInputs`` and may own
a per-layer module mounted here under its ``layer_module_name`` (DSA's ``sa_indexer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from keye_moe.cache import KVCache
from keye_moe.hookspecs import AttentionBackend, AttentionInputs
from keye_moe.layers.rmsnorm import RMSNorm
from keye_moe.layers.rope import apply_rotary


@dataclass
class StepContext:
    """What every layer of one forward call shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    cache: KVCache | None
    aux_losses: dict[str, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.head_dim = d
        self.scale = d**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.backend_module_name: str | None = None
        self.mount(backend)

    def mount(self, backend: AttentionBackend) -> None:
        """Attach the backend's per-layer module (if any), replacing a previous backend's."""
        if self.backend_module_name is not None:
            delattr(self, self.backend_module_name)
        self.backend = backend
        name = getattr(backend, "layer_module_name", None)
        module = backend.make_layer_module(self.layer_idx) if name else None
        self.backend_module_name = name if module is not None else None
        if module is not None:
            self.add_module(name, module)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim))
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin)
        k = apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        inputs = AttentionInputs(
            hidden_states=x,
            position_ids=ctx.position_ids,
            scale=self.scale,
            layer_idx=self.layer_idx,
            cu_seqlens=ctx.cu_seqlens,
            key_padding_mask=ctx.key_padding_mask,
            cache=ctx.cache.backend_state[self.layer_idx] if ctx.cache is not None else None,
            aux_losses=ctx.aux_losses,
            rotary=(ctx.cos, ctx.sin),
        )
        layer_module = getattr(self, self.backend_module_name) if self.backend_module_name else None
        out = self.backend.attention(q, k, v, inputs, layer_module)
        return self.o_proj(out.reshape(b, t, -1))
