"""``DSAttention``: a complete GQA attention layer with DeepSeek Sparse Attention (DESIGN §4)."""

from __future__ import annotations

import torch
from torch import nn

from keye_dsa.modules.cache import DSACache, StaticDSACache
from keye_dsa.modules.core import dsa_forward
from keye_dsa.modules.indexer import LightningIndexer
from keye_dsa.rope import apply_rope, rope_cos_sin


class DSAttention(nn.Module):
    """Qwen3-style GQA (q/k/v/o projections, per-head q/k RMSNorm, RoPE or M-RoPE) routed through DSA.

    The indexer lives at ``sa_indexer`` (the released Keye name). Pass a ``DSACache`` to decode or to
    prefill in chunks: each call appends its keys, and its queries are the newest tokens. With a
    ``StaticDSACache`` a decode step has fixed shapes and no host sync: a CUDA graph can capture it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        *,
        rope_theta: float = 1_000_000.0,
        mrope_section: list[int] | None = None,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
        bias: bool = False,
        index_heads: int = 4,
        index_head_dim: int = 128,
        topk: int = 2048,
        hadamard: bool = False,
        layer_idx: int = 0,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.rope_theta, self.mrope_section, self.layer_idx = rope_theta, mrope_section, layer_idx
        d = self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(num_heads * d, hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(d, eps=rms_norm_eps) if qk_norm else nn.Identity()
        self.sa_indexer = LightningIndexer(
            hidden_size, index_heads, index_head_dim, topk, rope_theta=rope_theta,
            mrope_section=mrope_section,
            decoder_head_dim=d, eps=rms_norm_eps, hadamard=hadamard,
        )  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cache: DSACache | StaticDSACache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        aux_losses: dict | None = None,
    ) -> torch.Tensor:
        """``hidden [B,T,hidden]`` -> ``[B,T,hidden]``; ``position_ids`` ``[B,T]`` or ``[3,B,T]``
        (default: continuing the cache); ``key_padding_mask`` covers cached and new keys."""
        batch, t, _ = hidden_states.shape
        if position_ids is None:
            position_ids = (
                torch.arange(t, device=hidden_states.device).expand(batch, t)
                if cache is None
                else cache.next_positions(self.layer_idx, batch, t, hidden_states.device)
            )
        d = self.head_dim
        q = self.q_norm(self.q_proj(hidden_states).view(batch, t, self.num_heads, d))
        k = self.k_norm(self.k_proj(hidden_states).view(batch, t, self.num_kv_heads, d))
        v = self.v_proj(hidden_states).view(batch, t, self.num_kv_heads, d)
        cos, sin = rope_cos_sin(position_ids, d, self.rope_theta, self.mrope_section)
        q, k = (apply_rope(x, cos.to(x.dtype), sin.to(x.dtype)) for x in (q, k))
        index_cache = None
        if cache is not None:
            k, v = cache.append_kv(self.layer_idx, k, v)
            index_cache = cache.layer(self.layer_idx)
        same_rope = self.sa_indexer.head_dim == d and self.sa_indexer.sections == self.mrope_section
        out = dsa_forward(
            q, k, v, self.sa_indexer, hidden_states, scale=self.scale, position_ids=position_ids,
            rope=(cos, sin) if same_rope else None, index_cache=index_cache, cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask, aux_losses=aux_losses,
        )  # fmt: skip
        return self.o_proj(out.reshape(batch, t, -1))
