"""Hooks that keye-moe consumes, and the typed contracts their components satisfy (DESIGN §2).

A plugin implements a hook with ``@pluggy.HookimplMarker("keye")`` (or ``keye_moe.plugins.hookimpl``)
in the module its ``keye`` entry point names. Every hook returns a dict of name -> factory.

Attention backends: the decoder owns q/k/v/o projections, q/k norms and RoPE; a backend supplies only
the attention op and, optionally, a per-layer module that the decoder mounts under ``self_attn``
(DSA mounts ``sa_indexer``). keye-dsa satisfies these protocols without importing keye-moe: it reads
the attributes of ``AttentionInputs`` and the decoder config by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pluggy
import torch
from torch import nn

hookspec = pluggy.HookspecMarker("keye")


@dataclass
class AttentionInputs:
    """Everything an attention backend may need beyond q, k and v, for one layer and one call.

    Shapes: q is ``[B, Tq, Hq, D]``; k and v are ``[B, Tk, Hkv, D]`` with ``Tk >= Tq``, the queries
    being the last ``Tq`` keys (earlier keys come from the decode cache). Packed batches have ``B == 1``
    and ``cu_seqlens`` (int32, ``[N + 1]``) marking N sequences that never attend across each other.
    """

    hidden_states: torch.Tensor  # [B, Tq, hidden]: this layer's normed input (the DSA indexer reads it)
    position_ids: torch.Tensor  # [B, Tq] (1-D RoPE) or [3, B, Tq] (M-RoPE) for the query tokens
    scale: float
    layer_idx: int = 0
    cu_seqlens: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None  # bool [B, Tk]; False marks left padding
    cache: dict[str, Any] | None = None  # the backend's own per-layer decode state; None: no cache
    aux_losses: dict[str, torch.Tensor] | None = None  # a backend adds training losses here
    # the decoder's (cos, sin) [B, Tq, head_dim] for the query tokens, scaled RoPE (rope_scaling) included
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


@runtime_checkable
class AttentionBackend(Protocol):
    """An attention op plus an optional per-layer module the decoder mounts under ``self_attn``."""

    layer_module_name: str | None

    def make_layer_module(self, layer_idx: int) -> nn.Module | None: ...

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inputs: AttentionInputs,
        layer_module: nn.Module | None,
    ) -> torch.Tensor:
        """Return the attention output ``[B, Tq, Hq, D]``."""
        ...


# A factory receives the decoder config (attributes: hidden_size, num_attention_heads,
# num_key_value_heads, head_dim, rope_theta, mrope_section, sa_config, ...) and returns a backend.
AttentionBackendFactory = Callable[[Any], AttentionBackend]


class ExpertBackend(Protocol):
    """Runs the routed SwiGLU experts for a flat batch of tokens."""

    def __call__(
        self,
        hidden: torch.Tensor,  # [N, H]
        topk_ids: torch.Tensor,  # [N, K] int
        topk_weights: torch.Tensor,  # [N, K], already renormalized when the config asks
        gate_up_proj: torch.Tensor,  # [E, 2I, H]: gate rows first, then up rows
        down_proj: torch.Tensor,  # [E, H, I]
    ) -> torch.Tensor:  # [N, H]
        ...


ExpertBackendFactory = Callable[[], ExpertBackend]


@hookspec
def keye_attention_backends() -> dict[str, AttentionBackendFactory]:  # type: ignore[empty-body]
    """Attention backends by name, e.g. ``sdpa`` (built in), ``flash``, ``dsa`` (keye-dsa)."""


@hookspec
def keye_expert_backends() -> dict[str, ExpertBackendFactory]:  # type: ignore[empty-body]
    """Expert backends by name, e.g. ``loop``, ``grouped_mm``, ``triton``."""
