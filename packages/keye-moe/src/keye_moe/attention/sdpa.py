"""The built-in dense attention backend: torch's scaled_dot_product_attention.

It is also the reference every other backend is compared against, so it handles every case the
decoder produces: plain causal prefill, decoding against a longer cache (queries are the last Tq
keys), left-padded batches, and packed sequences (one SDPA call per sequence, so no Tk x Tk mask
is ever built for a packed batch).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from keye_moe.hookspecs import AttentionInputs

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def causal_mask(
    q_len: int, k_len: int, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Bool mask ``[B or 1, 1, Tq, Tk]``: query i sees key j when ``j <= i + (Tk - Tq)`` and j is real.

    A query that sees no key at all (a left-padding position) is allowed every key so its softmax
    stays finite; its output is never used.
    """
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    mask = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
) -> torch.Tensor:
    """Causal GQA attention on ``[B, T, H, D]`` tensors; returns ``[B, Tq, Hq, D]``."""
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(f"attention expects q/k/v head dims to agree; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if inputs.cu_seqlens is not None:
        return _packed(q, k, v, inputs)
    q_len, k_len = q.shape[1], k.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if inputs.key_padding_mask is None and q_len == k_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=inputs.scale, enable_gqa=True)
        return out.transpose(1, 2)
    # Decoding against the cache. cuDNN is kept out: it builds a new plan for every new key length
    # (seen on an H200 with torch 2.11: ~10 ms of host time per layer and step).
    with sdpa_kernel(_DECODE_BACKENDS):
        if inputs.key_padding_mask is None and q_len == 1:
            # one query after every key sees them all: no mask, so the fused kernels apply
            out = F.scaled_dot_product_attention(qt, kt, vt, scale=inputs.scale, enable_gqa=True)
        else:
            mask = causal_mask(q_len, k_len, inputs.key_padding_mask, q.device)
            out = F.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=mask, scale=inputs.scale, enable_gqa=True
            )
    return out.transpose(1, 2)


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    cu = inputs.cu_seqlens
    assert cu is not None
    if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
        raise ValueError(
            "packed attention (cu_seqlens) expects batch 1 and no cache prefix; "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if int(cu[-1]) != q.shape[1]:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the packed batch holds {q.shape[1]} tokens")
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        if end > start:
            qs, ks, vs = (x[:, start:end].transpose(1, 2) for x in (q, k, v))
            out[:, start:end] = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=inputs.scale, enable_gqa=True
            ).transpose(1, 2)
    return out


class SdpaAttention:
    """Dense backend: no per-layer module, no decode state beyond the decoder's own KV cache."""

    layer_module_name: str | None = None

    def __init__(self, config: object | None = None):
        self.config = config

    def make_layer_module(self, layer_idx: int) -> nn.Module | None:
        return None

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inputs: AttentionInputs,
        layer_module: nn.Module | None,
    ) -> torch.Tensor:
        return dense_attention(q, k, v, inputs)
