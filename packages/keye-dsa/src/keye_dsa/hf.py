"""``patch_model`` / ``unpatch_model``: DSA for Hugging Face Llama / Qwen2 / Qwen3 / Qwen3-MoE models.

The patch mounts a ``LightningIndexer`` at ``self_attn.sa_indexer`` of every attention layer (the
released Keye name, so checkpoints with indexer weights load into a patched model), records each
layer's input with a forward pre-hook, and routes attention through a ``keye_dsa`` entry of
transformers' ``AttentionInterface`` (with SDPA's mask builder, so padding masks arrive as bool).
Needs the ``hf`` extra (transformers).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from keye_dsa.modules.core import dsa_forward
from keye_dsa.modules.indexer import LightningIndexer

IMPL = "keye_dsa"
_STATE = "_keye_dsa_state"  # per attention module: hook handle, captured inputs, index cache, aux dict


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))
        and not isinstance(m, LightningIndexer)
    ]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, _hf_dsa_attention)
    AttentionMaskInterface.register(IMPL, sdpa_mask)


def _capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(module, _STATE)
    state["hidden_states"] = args[0] if args else kwargs["hidden_states"]
    state["position_embeddings"] = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
    caches = [kwargs.get(n) for n in ("cache", "past_key_values", "past_key_value")]
    state["cache"] = next((c for c in caches if c is not None), None)
    state["caching"] = state["cache"] is not None


def _key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF's mask (bool or additive, ``[B,1,Tq,Tk]`` or ``[B,Tk]``) -> keys the newest query may see."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0, -1, :]
    mask = mask if mask.dtype == torch.bool else mask == 0
    return None if bool(mask.all()) else mask


def _packed_bounds(position_ids, mask, batch: int, tq: int, tk: int) -> torch.Tensor | None:
    """``cu_seqlens`` of the batch flattened to one row when its rows hold packed sequences (transformers'
    packed format: positions restart at each sequence and the mask keeps each sequence to itself), else
    None. Left padding (where positions also jump) comes out as one-token sequences of padding, which
    changes nothing for the real tokens."""
    if position_ids is None or mask is None or mask.dim() != 4 or tq != tk or tq < 2:
        return None
    position_ids = position_ids.expand(batch, tq)
    row, before = (torch.diff(position_ids, dim=-1) != 1).nonzero(as_tuple=True)
    if not len(row):
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    sees_previous = allowed[row if allowed.shape[0] > 1 else 0, 0, before + 1, before]
    if bool(sees_previous.all()):
        return None  # positions jump but attention runs across: one sequence per row
    if bool(sees_previous.any()):
        raise ValueError(
            "position_ids restart inside a row, but the attention mask separates only some of those "
            "sequences; DSA supports packed sequences (each attending to itself) or left padding"
        )
    starts = torch.cat([torch.arange(batch, device=row.device) * tq, row * tq + before + 1])
    ends = torch.tensor([batch * tq], device=row.device)
    return torch.cat([starts.sort().values, ends]).to(torch.int32)


def _hf_dsa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: ``query [B,Hq,T,D]``, ``key/value [B,Hkv,S,D]`` -> ``[B,T,Hq,D]``."""
    if dropout:
        raise ValueError("DSA attention has no attention dropout; set attention_dropout=0")
    state = getattr(module, _STATE)
    indexer: LightningIndexer = module.sa_indexer
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    (b, tq), tk = q.shape[:2], k.shape[1]
    index_cache = None
    key_padding = attention_mask
    static_layer = _static_layer(state.get("cache"), module.layer_idx)
    if static_layer is not None:
        index_cache = _static_index_cache(state, static_layer, b, tq, attention_mask)
        key_padding = None  # the index cache carries each row's first real key
    elif state.get("caching"):
        if tk == tq:
            state["index_cache"] = {}
        index_cache = state.get("index_cache")
    rope = state.get("position_embeddings")
    position_ids = kwargs.get("position_ids")
    if rope is not None and rope[0].shape[-1] != indexer.head_dim:
        rope = None
    if rope is None and position_ids is None:
        position_ids = (
            torch.arange(tk - tq, tk, device=q.device) if static_layer is None else index_cache["positions"]
        ).expand(b, tq)
    hidden = state["hidden_states"]
    state["hidden_states"] = state["position_embeddings"] = None
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    cu_seqlens = None if index_cache is not None else _packed_bounds(position_ids, attention_mask, b, tq, tk)
    if cu_seqlens is None:
        out = dsa_forward(
            q, k, v, indexer, hidden, scale=scale, position_ids=position_ids, rope=rope,
            index_cache=index_cache, key_padding_mask=_key_padding(key_padding),
            aux_losses=state["aux_losses"],
        )  # fmt: skip
        return out, None

    def one_row(x):  # [B, T, ...] (or broadcast [1, T, ...]) -> [1, B*T, ...]
        return x.expand(b, *x.shape[1:]).reshape(1, b * tq, *x.shape[2:])

    out = dsa_forward(
        one_row(q), one_row(k), one_row(v), indexer, one_row(hidden), scale=scale,
        position_ids=one_row(position_ids) if position_ids is not None else None,
        rope=tuple(one_row(r) for r in rope) if rope is not None else None,
        cu_seqlens=cu_seqlens, aux_losses=state["aux_losses"],
    )  # fmt: skip
    return out.reshape(b, tq, *out.shape[2:]), None


def _static_layer(cache, layer_idx: int):
    """The layer of a transformers ``StaticCache`` (fixed-size K/V buffers, filled length on the device),
    or None for any other cache."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layer = getattr(cache, "layers", None) and cache.layers[layer_idx]
    if not isinstance(layer, StaticLayer):
        return None
    if isinstance(layer, StaticSlidingWindowLayer):
        raise ValueError("DSA attends over the whole cache: a sliding-window static cache is not supported")
    return layer


def _static_index_cache(state: dict, layer, batch: int, tq: int, attention_mask) -> dict:
    """The static index-key cache (``StaticDSACache``'s layout) riding on a transformers static layer:
    this call's rows and the filled length come from the layer's ``cumulative_length`` (already advanced
    by the K/V update), so both caches stay in step without a host sync, and a reset of the transformers
    cache resets this one. Each row's first real key is the first one the newest query may see."""
    index_cache = state.get("index_cache")
    if index_cache is None or index_cache.get("owner") is None or index_cache["owner"]() is not layer:
        index_cache = state["index_cache"] = {
            "static": True, "owner": weakref.ref(layer), "capacity": layer.max_cache_len, "index_dtype": None,
        }  # fmt: skip
    length = layer.cumulative_length.reshape(1)
    index_cache["length"] = length
    index_cache["lengths"] = length.to(torch.int32).expand(batch)
    index_cache["positions"] = length - tq + torch.arange(tq, device=length.device)
    key_start = None
    if attention_mask is not None:
        allowed = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
        key_start = allowed.to(torch.int32).argmax(-1).to(torch.int32).expand(batch)  # first True
    index_cache["key_start"] = key_start
    return index_cache


def patch_model(
    model: nn.Module,
    topk: int = 2048,
    num_heads: int = 4,
    head_dim: int = 128,
    *,
    hadamard: bool = False,
    mode: str = "sparse",
) -> nn.Module:
    """Turn a Hugging Face GQA model into a DSA model in place and return it.

    Adds ``sa_indexer`` to every attention layer (fresh weights, same device and dtype as the layer) and
    switches attention to DSA. Indexer KL losses of a training forward collect in
    ``model.keye_dsa_aux_losses["indexer_kl"]`` (read and clear it each step; see ``set_dsa_mode``).
    """
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(f"patch_model found no Llama/Qwen-style attention layers in {type(model).__name__}")
    if hasattr(layers[0], _STATE):
        raise ValueError("patch_model: this model is already patched")
    config = model.config
    rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    model_head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type not in ("default", "mrope") and head_dim != model_head_dim:
        raise ValueError(
            f"patch_model: the model scales its RoPE ({rope_type!r}) and the indexer rotates by the model's "
            f"own cos/sin, so head_dim ({head_dim}) must equal the model's head_dim ({model_head_dim})"
        )
    _register()
    aux: dict = {}
    for attn in layers:
        weight = attn.q_proj.weight
        attn.sa_indexer = LightningIndexer(
            config.hidden_size, num_heads, head_dim, topk, rope_theta=theta,
            eps=getattr(config, "rms_norm_eps", 1e-6), hadamard=hadamard, mode=mode,
        ).to(device=weight.device, dtype=weight.dtype)  # fmt: skip
        handle = attn.register_forward_pre_hook(_capture, with_kwargs=True)
        setattr(attn, _STATE, {"handle": handle, "aux_losses": aux})
    model.keye_dsa_aux_losses = aux
    model._keye_dsa_previous_impl = config._attn_implementation
    _set_impl(model, IMPL)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: drop the indexers and hooks and restore the previous attention implementation."""
    layers = [m for m in _attention_layers(model) if hasattr(m, _STATE)]
    if not layers:
        raise ValueError("unpatch_model: this model is not patched")
    for attn in layers:
        getattr(attn, _STATE)["handle"].remove()
        delattr(attn, _STATE)
        del attn.sa_indexer
    _set_impl(model, model._keye_dsa_previous_impl)
    del model._keye_dsa_previous_impl, model.keye_dsa_aux_losses
    return model


def _set_impl(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
