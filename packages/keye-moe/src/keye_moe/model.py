"""KeyeMoeForCausalLM: the Qwen3-MoE decoder (DESIGN §5) with pluggable attention and expert backends.

Parameter names are the checkpoint names of DESIGN §7 (``model.layers.N...``, ``lm_head``), so
``state_dict()`` keys and released checkpoints agree except for the expert form, which
``keye_moe.checkpoint`` converts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from keye_moe import registry
from keye_moe.cache import KVCache
from keye_moe.config import DecoderConfig
from keye_moe.hookspecs import AttentionBackend, ExpertBackend
from keye_moe.layers.attention import Attention, StepContext
from keye_moe.layers.moe import DenseMLP, Experts, SparseMoeBlock
from keye_moe.layers.rmsnorm import RMSNorm
from keye_moe.layers.rope import RotaryEmbedding
from keye_moe.layers.router import Router, RouterStats, switch_aux_loss

log = logging.getLogger(__name__)


def resolve_attn_implementation(config: DecoderConfig) -> str:
    """The configured backend name, or for None: ``dsa`` when sa_config is set and keye-dsa is installed."""
    if config.attn_implementation is not None:
        return config.attn_implementation
    if config.sa_config is not None:
        if "dsa" in registry.attention_backends():
            return "dsa"
        log.warning(
            "sa_config is set but no 'dsa' attention backend is installed (pip install keye-dsa); "
            "using dense 'sdpa' attention and ignoring sa_indexer weights"
        )
    return "sdpa"


class _ExpertBackendTable(dict):
    """name -> expert backend instance, created from the plugin registry on first use."""

    def __missing__(self, name: str) -> ExpertBackend:
        backend = registry.make_expert_backend(name)
        self[name] = backend
        return backend


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy + router_aux_loss_coef * aux_loss (with labels)
    aux_loss: torch.Tensor | None = None  # the Switch load-balancing loss (None when not computed)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # losses added by attention backends
    last_hidden_state: torch.Tensor | None = None
    cache: KVCache | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int, attn: AttentionBackend, experts: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, attn)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = SparseMoeBlock(config, experts)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, ctx: StepContext, token_mask: torch.Tensor | None, need_stats: bool = True
    ) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            out, stats = self.mlp(h, token_mask, need_stats)
            return x + out, stats
        return x + self.mlp(h), None


class KeyeMoeModel(nn.Module):
    def __init__(self, config: DecoderConfig, attn: AttentionBackend, experts: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, attn, experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.mrope_section,
            config.mrope_interleaved,
            config.rope_scaling,
        )


class KeyeMoeForCausalLM(nn.Module):
    """Qwen3-MoE causal LM. ``forward`` for training/scoring, ``generate`` for decoding."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.attn_implementation = resolve_attn_implementation(config)
        self.attention_backend = registry.make_attention_backend(self.attn_implementation, config)
        self.expert_backends = _ExpertBackendTable()
        self.model = KeyeMoeModel(config, self.attention_backend, self.expert_backends)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ setup
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, modules: list[nn.Module] | None = None) -> None:
        """Qwen3-MoE's init: normal(0, initializer_range) for matrices, ones for norms, zero biases.

        Modules that keye-moe does not know (a backend's layer module) keep their own initialization.
        """
        std = self.config.initializer_range
        for module in modules if modules is not None else list(self.modules()):
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
                    module.expert_load.zero_()  # type: ignore[union-attr]
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_expert_implementation(self, name: str) -> None:
        """Switch every MoE layer to another expert backend (loop, grouped_mm, triton or auto)."""
        if name != "auto":
            self.expert_backends[name]
        self.config.expert_implementation = name
        for module in self.modules():
            if isinstance(module, SparseMoeBlock):
                module.implementation = name

    def set_attn_implementation(self, name: str) -> None:
        """Switch the attention backend; a backend with a per-layer module gets fresh modules mounted."""
        backend = registry.make_attention_backend(name, self.config)
        p = next(self.parameters())
        for layer in self.model.layers:
            layer.self_attn.mount(backend)
            if layer.self_attn.backend_module_name:
                getattr(layer.self_attn, layer.self_attn.backend_module_name).to(
                    device=p.device, dtype=p.dtype
                )
        self.attention_backend = backend
        self.attn_implementation = name
        self.config.attn_implementation = name

    def update_expert_bias(self) -> None:
        """One aux-loss-free balancing step from the loads counted since the last call (training loop)."""
        for module in self.modules():
            if isinstance(module, Router):
                module.update_bias(self.config.expert_bias_update_rate)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        compute_aux_loss: bool = True,
    ) -> CausalLMOutput:
        """Run the decoder.

        ``input_ids [B, T]`` or ``inputs_embeds [B, T, hidden]`` (exactly one); ``position_ids`` ``[B, T]``
        or ``[3, B, T]`` (M-RoPE); ``cu_seqlens`` (int32 ``[N + 1]``) for a packed ``B == 1`` batch, whose
        positions then restart at each sequence by default; ``attention_mask [B, T]`` (1 = real token,
        left padding only); ``labels [B, T]`` (-100 ignored) give ``loss``; ``logits_to_keep`` > 0
        computes logits only for the last tokens.
        """
        x = self._embed(input_ids, inputs_embeds)
        b, t, _ = x.shape
        if cu_seqlens is not None:
            cu_seqlens = self._check_cu_seqlens(cu_seqlens, b, t, cache)
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be [B, T] = {(b, t)}; got {tuple(attention_mask.shape)}")
        position_ids = self._positions(position_ids, b, t, x.device, cu_seqlens, attention_mask, cache)
        key_padding_mask = None
        if cache is not None:
            cache.extend_padding(attention_mask, b, t, x.device)
            key_padding_mask = cache.key_padding_mask
        elif attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.to(torch.bool)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        ctx = StepContext(cos, sin, position_ids, cu_seqlens, key_padding_mask, cache, {})
        token_mask = attention_mask if key_padding_mask is not None and attention_mask is not None else None
        stats: list[RouterStats] = []
        balancing = self.training and self.config.expert_bias
        need_stats = compute_aux_loss or balancing
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, s = checkpoint(layer, x, ctx, token_mask, need_stats, use_reentrant=False)
            else:
                x, s = layer(x, ctx, token_mask, need_stats)
            if s is not None:
                stats.append(s)
                if balancing:
                    layer.mlp.gate.record_load(s)
        x = self.model.norm(x)
        if cache is not None:
            cache.advance(t, position_ids)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        aux = switch_aux_loss(stats, self.config.num_experts) if stats and compute_aux_loss else None
        loss = None
        if labels is not None:
            loss = self._lm_loss(logits, labels, cu_seqlens)
            if aux is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * aux
        return CausalLMOutput(logits, loss, aux, ctx.aux_losses, x, cache)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, hidden]")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
                raise ValueError(
                    "input_ids must be an integer [B, T] tensor; "
                    f"got {input_ids.dtype} {tuple(input_ids.shape)}"
                )
            return self.model.embed_tokens(input_ids)
        assert inputs_embeds is not None
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [B, T, hidden={self.config.hidden_size}]; "
                f"got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    @staticmethod
    def _check_cu_seqlens(cu: torch.Tensor, b: int, t: int, cache: KVCache | None) -> torch.Tensor:
        if b != 1 or cache is not None:
            raise ValueError(f"cu_seqlens needs a packed batch of size 1 and no cache; got batch {b}")
        if (
            cu.dim() != 1
            or cu.numel() < 2
            or int(cu[0]) != 0
            or int(cu[-1]) != t
            or bool((cu.diff() < 0).any())
        ):
            raise ValueError(
                f"cu_seqlens must be non-decreasing, start at 0 and end at T={t}; got {cu.tolist()}"
            )
        return cu.to(torch.int32)

    def _positions(self, position_ids, b, t, device, cu_seqlens, attention_mask, cache) -> torch.Tensor:
        if position_ids is not None:
            ok = (position_ids.dim() == 2 and tuple(position_ids.shape) == (b, t)) or (
                position_ids.dim() == 3 and tuple(position_ids.shape) == (3, b, t)
            )
            if not ok:
                raise ValueError(
                    f"position_ids must be [B, T] or [3, B, T] with B, T = {b}, {t}; "
                    f"got {tuple(position_ids.shape)}"
                )
            if position_ids.dim() == 3 and self.config.mrope_section is None:
                raise ValueError("3-D (M-RoPE) position_ids need DecoderConfig.mrope_section")
            return position_ids
        steps = torch.arange(t, device=device)
        if cu_seqlens is not None:
            starts = cu_seqlens[:-1].long()
            seq = torch.searchsorted(cu_seqlens[1:].long(), steps, right=True)
            return (steps - starts[seq])[None]
        if cache is not None and cache.next_position is not None:
            return cache.next_position[:, None] + steps[None]
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return steps[None].expand(b, t)

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Next-token cross-entropy as transformers computes it; a packed batch never predicts across
        a sequence boundary."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])}; got {tuple(labels.shape)}")
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()
        if cu_seqlens is not None:
            ends = cu_seqlens[1:-1].long() - 1
            shifted[0, ends[ends >= 0]] = -100
        return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ checkpoints and generation
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        config: DecoderConfig | None = None,
        strict: bool = True,
    ) -> KeyeMoeForCausalLM:
        """Load ``config.json`` + safetensors shards (per-expert or fused v5 expert names), lazily.

        The model is built on the meta device, materialized once on ``device`` in ``dtype`` (default:
        the checkpoint's), then filled tensor by tensor, shard by shard; no second copy is ever held.
        """
        from keye_moe.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, config=config, strict=strict)

    def save_pretrained(
        self, path: str | Path, *, max_shard_size: int | str = "5GB", expert_format: str = "per_expert"
    ) -> None:
        """Write ``config.json``, ``model-0000i-of-0000n.safetensors`` shards and the index."""
        from keye_moe.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, expert_format=expert_format)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Decode new tokens; see ``keye_moe.generation.generate`` for every option."""
        from keye_moe.generation import generate

        return generate(self, input_ids, **kwargs)


def build_on_meta(config: DecoderConfig) -> KeyeMoeForCausalLM:
    """The model with every parameter on the meta device: instant, for counting and for lazy loading."""
    with torch.device("meta"):
        return KeyeMoeForCausalLM(config)
