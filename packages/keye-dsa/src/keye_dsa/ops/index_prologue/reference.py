"""The indexer's prologue in plain PyTorch: the ground truth of ``triton_kernel.py`` (DESIGN §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye_dsa.hadamard import hadamard_rotate
from keye_dsa.ops.indexer_topk.decode import quantize_index_keys
from keye_dsa.rope import apply_rope, rope_cos_sin


def index_prologue_reference(
    q_all: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    *,
    num_heads: int,
    q_eps: float,
    k_eps: float,
    out_dtype: torch.dtype,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    rope_theta: float | None = None,
    sections: list[int] | None = None,
    hadamard: bool = False,
    fp8_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """See ``index_prologue``: fp32 norms, RoPE and rotation, then the cast (and FP8 quantization)."""
    batch, t, _ = q_all.shape
    d = k.shape[-1]
    cos, sin = rope if rope is not None else rope_cos_sin(position_ids, d, rope_theta, sections)
    q = q_all[..., : num_heads * d].reshape(batch, t, num_heads, d)
    weights = q_all[..., num_heads * d :].float()
    q = F.rms_norm(q.float(), (d,), q_norm_weight.float(), q_eps)
    k = F.layer_norm(k.float(), (d,), k_norm_weight.float(), k_norm_bias.float(), k_eps)
    cos, sin = cos.float(), sin.float()
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if hadamard:
        q, k = hadamard_rotate(q), hadamard_rotate(k)
    q, k = q.to(out_dtype), k.to(out_dtype)
    if not fp8_keys:
        return q, k, weights, None
    k8, k_scale = quantize_index_keys(k.detach())
    return q, k8, weights, k_scale
