"""The ``dsa`` attention backend for keye-moe's decoder (DESIGN §2), satisfied without importing keye-moe.

The decoder owns the projections, q/k norms and RoPE, mounts ``make_layer_module(i)`` under
``self_attn.sa_indexer`` and calls ``attention(q, k, v, inputs, layer_module)``; ``inputs`` is read by
attribute (``hidden_states``, ``position_ids``, ``scale``, ``cu_seqlens``, ``key_padding_mask``,
``cache``, ``aux_losses``, ``rotary``).

When the decoder scales its RoPE for long context (``rope_scaling``: linear, llama3, yarn), the indexer
rotates by the decoder's own scaled cos/sin (``inputs.rotary``), as DeepSeek-V3.2's indexer shares the
model's YaRN rotary and as ``patch_model`` does with a Hugging Face model's; unscaled, it computes its own
RoPE from ``rope_theta`` and the sections (DESIGN §4).
"""

from __future__ import annotations

from typing import Any

import torch

from keye_dsa.modules.core import dsa_forward
from keye_dsa.modules.indexer import LightningIndexer

SA_DEFAULTS = {"indexer_num_heads": 4, "indexer_head_dim": 128, "topk": 2048}


def _sa_value(sa_config: Any, name: str):
    if sa_config is None:
        return SA_DEFAULTS[name]
    if isinstance(sa_config, dict):
        return sa_config.get(name, SA_DEFAULTS[name])
    return getattr(sa_config, name, SA_DEFAULTS[name])


class DSABackend:
    """Builds one ``LightningIndexer`` per layer from the decoder config and runs DSA attention."""

    layer_module_name: str | None = "sa_indexer"

    def __init__(self, config: Any):
        self.config = config
        self.hidden_size = int(config.hidden_size)
        self.head_dim = int(
            getattr(config, "head_dim", None) or self.hidden_size // config.num_attention_heads
        )
        self.num_heads = int(_sa_value(getattr(config, "sa_config", None), "indexer_num_heads"))
        self.index_dim = int(_sa_value(getattr(config, "sa_config", None), "indexer_head_dim"))
        self.topk = int(_sa_value(getattr(config, "sa_config", None), "topk"))
        self.rope_theta = float(getattr(config, "rope_theta", 1_000_000.0))
        section = getattr(config, "mrope_section", None)
        self.mrope_section = list(section) if section else None
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.scaled_rope = bool(getattr(config, "rope_scaling", None))
        if self.scaled_rope and self.index_dim != self.head_dim:
            raise ValueError(
                f"the dsa backend shares the decoder's scaled RoPE (rope_scaling) with the indexer, so "
                f"sa_config indexer_head_dim ({self.index_dim}) must equal head_dim ({self.head_dim})"
            )

    def make_layer_module(self, layer_idx: int) -> LightningIndexer:
        return LightningIndexer(
            self.hidden_size, self.num_heads, self.index_dim, self.topk, rope_theta=self.rope_theta,
            mrope_section=self.mrope_section, decoder_head_dim=self.head_dim, eps=self.eps,
        )  # fmt: skip

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: Any, layer_module: Any
    ) -> torch.Tensor:
        if not isinstance(layer_module, LightningIndexer):
            got = type(layer_module).__name__
            raise TypeError(f"the dsa backend needs the layer's sa_indexer (a LightningIndexer); got {got}")
        position_ids = inputs.position_ids
        if position_ids is not None and position_ids.dim() == 3 and layer_module.sections is None:
            position_ids = position_ids[0]  # M-RoPE positions on a text-only config: temporal row
        return dsa_forward(
            q, k, v, layer_module, inputs.hidden_states, scale=inputs.scale, position_ids=position_ids,
            rope=getattr(inputs, "rotary", None) if self.scaled_rope else None, index_cache=inputs.cache,
            cu_seqlens=inputs.cu_seqlens, key_padding_mask=inputs.key_padding_mask,
            aux_losses=inputs.aux_losses,
        )  # fmt: skip
