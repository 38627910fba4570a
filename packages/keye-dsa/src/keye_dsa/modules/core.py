"""The DSA attention step shared by ``DSAttention``, the keye-moe backend and the Hugging Face patch.

Given the decoder's post-RoPE q/k/v and the layer's normed hidden states, it runs the indexer, extends
the index-key cache, picks each query's top-k keys, attends sparsely, and adds the indexer's KL loss
when training. The indexer's ``mode`` picks the stage (see ``LightningIndexer``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from keye_dsa.modules.cache import append_rows, write_rows
from keye_dsa.modules.indexer import DECODE_ROWS, LightningIndexer
from keye_dsa.ops.indexer_kl import indexer_kl_loss
from keye_dsa.ops.indexer_topk.decode import dequantize_index_keys
from keye_dsa.ops.sparse_attention import sparse_attention, sparse_attention_varlen


def left_padding_starts(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``key_padding_mask`` (bool ``[B,Tk]``, False = padding) -> first real key per row, or None.

    DSA's kernels take padding as a per-row start, so only left padding is accepted.
    """
    if key_padding_mask is None:
        return None
    mask = key_padding_mask.to(torch.bool)
    starts = (~mask).sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] >= starts[:, None]
    if not torch.equal(mask, expected):
        raise ValueError(
            "DSA supports left padding only: key_padding_mask rows must be False...False True...True"
        )
    return starts.to(torch.int32)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention on ``[B,T,H,D]`` (queries are the last ``Tq`` keys), via SDPA.

    ``lengths [B]`` (a static cache): only the first ``lengths[b]`` keys are filled, and the queries are
    the last ``Tq`` of those; the mask is built on the device."""
    if cu_seqlens is not None:
        out = torch.empty_like(q)
        bounds = [int(x) for x in cu_seqlens.tolist()]
        for a, b in itertools.pairwise(bounds):
            if b > a:
                out[:, a:b] = dense_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale)
        return out
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    tq, tk = q.shape[1], k.shape[1]
    if key_start is None and lengths is None and (tq == tk or tq == 1):
        # no mask (one new token sees every key): SDPA may take its flash or cuDNN kernels
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=tq > 1, scale=scale, enable_gqa=True)
    else:
        pos = torch.arange(tk, device=q.device)
        filled = tk if lengths is None else lengths.to(q.device)[:, None, None, None]
        mask = pos <= torch.arange(tq, device=q.device)[:, None] - tq + filled  # [Tq,Tk] or [B,1,Tq,Tk]
        if key_start is not None:
            mask = mask & (pos >= key_start.to(q.device)[:, None])[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)  # padding queries see everything; never used
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def dsa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indexer: LightningIndexer,
    hidden_states: torch.Tensor,
    *,
    scale: float,
    position_ids: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    index_cache: dict | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    aux_losses: dict | None = None,
) -> torch.Tensor:
    """DSA attention output ``[B,Tq,Hq,D]``; ``index_cache`` (a dict) keeps the index keys for decoding.

    A ``StaticDSACache`` layer (``index_cache["static"]``) gives ``k``, ``v`` and the index keys at full
    capacity with the filled length on the device: up to ``DECODE_ROWS`` new tokens are attended without a
    host sync (a CUDA graph can capture the step); a longer chunk reads the length and runs on the filled
    rows, as with ``DSACache``."""
    key_start = left_padding_starts(key_padding_mask)
    static = index_cache is not None and index_cache.get("static", False)
    lengths = None
    if static:
        if key_start is None:
            key_start = index_cache["key_start"]
        if q.shape[1] <= DECODE_ROWS:
            lengths = index_cache["lengths"]
        else:  # a prefill chunk: the filled rows, by a host read of the length
            n = _host_length(index_cache)
            k, v = k[:, :n], v[:, :n]
    if indexer.mode == "off":
        return dense_attention(q, k, v, scale, key_start, cu_seqlens, lengths)
    # The indexer learns only from its KL: its input is detached so the LM loss never reaches it.
    fp8 = index_cache is not None and index_cache.get("index_dtype") == torch.float8_e4m3fn
    q_index, k_index, weights, k_scale = indexer.project(
        hidden_states.detach(), position_ids, rope, fp8_keys=fp8
    )
    k_all, k_scale = extend_index_cache(index_cache, k_index, k_scale)
    if static and lengths is None:
        k_all, k_scale = k_all[:, : k.shape[1]], None if k_scale is None else k_scale[:, : k.shape[1]]
    if k_all.shape[1] != k.shape[1]:
        raise ValueError(
            f"the index-key cache holds {k_all.shape[1]} keys but k holds {k.shape[1]}: "
            "the DSA cache and the decoder's KV cache are out of step"
        )
    want_kl = aux_losses is not None and indexer.training and torch.is_grad_enabled()
    # dequantized only for the loss: a decode step must not copy the whole FP8 cache
    kl_keys = (
        k_all if k_scale is None or not want_kl else dequantize_index_keys(k_all, k_scale, q_index.dtype)
    )
    if indexer.mode == "dense_warmup":
        out = dense_attention(q, k, v, scale, key_start, cu_seqlens, lengths)
        if want_kl:
            _add_kl(aux_losses, q, k, q_index, kl_keys, weights, None, scale, key_start, cu_seqlens)
        return out
    indices = indexer.select(
        q_index, k_all, weights, key_start=key_start, cu_seqlens=cu_seqlens, k_scale=k_scale,
        lengths=lengths,
    )  # fmt: skip
    if cu_seqlens is not None:
        out = sparse_attention_varlen(q[0], k[0], v[0], indices[0], cu_seqlens, scale=scale)[None]
    else:
        out = sparse_attention(q, k, v, indices, scale=scale, validate_indices=False)
    if want_kl:
        _add_kl(aux_losses, q, k, q_index, kl_keys, weights, indices, scale, key_start, cu_seqlens)
    return out


def extend_index_cache(index_cache: dict | None, k_index: torch.Tensor, k_scale: torch.Tensor | None):
    """Appends this call's index keys to ``index_cache`` (a layer's dict: ``"k_index"``, and with
    ``"index_dtype"`` FP8 the per-key ``"k_index_scale"``, each in a growing buffer: ``append_rows``, or
    a static cache's: ``write_rows``); returns every key so far and their scales (``None`` unless FP8).
    FP8 keys come quantized, with ``k_scale``: ``dsa_forward`` asks ``LightningIndexer.project`` for them
    when the cache's ``"index_dtype"`` is FP8. Without FP8 the returned keys keep this call's autograd
    graph."""
    if index_cache is None:
        return k_index, k_scale
    capacity = index_cache.get("capacity", 0)
    append = write_rows if index_cache.get("static", False) else append_rows
    keys = append(index_cache, "k_index", k_index, capacity)
    return keys, None if k_scale is None else append(index_cache, "k_index_scale", k_scale, capacity)


def _host_length(index_cache: dict) -> int:
    """The filled length of a static cache's layer, read on the host (a sync: refused while capturing)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"a StaticDSACache forward of more than {DECODE_ROWS} tokens reads the cache length on the "
            "host and cannot be captured in a CUDA graph: capture decode steps, prefill eagerly"
        )
    return int(index_cache["length"])


def _add_kl(aux_losses, q, k, q_index, k_index, weights, indices, scale, key_start, cu_seqlens):
    """Adds this layer's mean-per-query KL to ``aux_losses["indexer_kl"]`` (summed over layers)."""
    if cu_seqlens is not None:
        loss = indexer_kl_loss(
            q[0], k[0], q_index[0], k_index[0], weights[0],
            indices=None if indices is None else indices[0], scale=scale, cu_seqlens=cu_seqlens,
            reduction="mean",
        )  # fmt: skip
    else:
        loss = indexer_kl_loss(
            q,
            k,
            q_index,
            k_index,
            weights,
            indices=indices,
            scale=scale,
            key_start=key_start,
            reduction="mean",
        )
    aux_losses["indexer_kl"] = aux_losses["indexer_kl"] + loss if "indexer_kl" in aux_losses else loss
