"""``index_prologue``: the Lightning Indexer between its projections and the top-k (DESIGN §4).

From the fused query projection ``q_all [B,T,H*D+H]`` (``H`` index queries, then their gates) and the
key projection ``k [B,T,D]``: ``q_norm`` (RMSNorm per head) and ``k_norm`` (LayerNorm with bias) in
fp32, neox RoPE (or M-RoPE: the caller's ``cos, sin``) on both, the optional orthonormal Hadamard
rotation, the cast to ``out_dtype``, and with ``fp8_keys`` the key's e4m3 quantization (one fp32 scale
per key, ``quantize_index_keys``). A Triton kernel on CUDA does it in one launch (a decode step's
prologue was ~30 small launches); it is forward only, so while autograd needs the result (training the
indexer) the reference runs.
"""

from __future__ import annotations

import torch

from keye_dsa._checks import check_float, check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.index_prologue.reference import index_prologue_reference


def index_prologue(
    q_all: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    *,
    num_heads: int,
    q_eps: float,
    k_eps: float,
    out_dtype: torch.dtype | None = None,
    hadamard: bool = False,
    fp8_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q_index [B,T,H,D], k_index [B,T,D], weights [B,T,H] fp32, k_scale)``.

    ``cos, sin`` broadcast to ``[B,T,D]``; ``out_dtype`` (default ``q_all``'s) is the queries' and
    keys' dtype; with ``fp8_keys`` the keys are ``torch.float8_e4m3fn`` and ``k_scale [B,T]`` fp32 their
    scales (else ``None``)."""
    check_rank("q_all", q_all, 3, "[batch, seq, heads * index_dim + heads]")
    check_rank("k", k, 3, "[batch, seq, index_dim]")
    for name, x in (("q_all", q_all), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, x)
    batch, t, width = q_all.shape
    d = k.shape[-1]
    check_same("k.shape[:2]", tuple(k.shape[:2]), "q_all.shape[:2]", (batch, t))  # type: ignore[arg-type]
    check_same("q_all.shape[-1]", width, "heads * (index_dim + 1)", num_heads * (d + 1))
    if d % 2:
        raise ValueError(f"index_dim must be even (RoPE); got {d}")
    if hadamard and d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two index_dim; got {d}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape[-1] != d or torch.broadcast_shapes(x.shape, (batch, t, d)) != (batch, t, d):
            raise ValueError(
                f"{name} must broadcast to [batch, seq, {d}] = {[batch, t, d]}; got {list(x.shape)}"
            )
    for name, x in (
        ("q_norm_weight", q_norm_weight),
        ("k_norm_weight", k_norm_weight),
        ("k_norm_bias", k_norm_bias),
    ):
        check_same(f"{name}.shape", tuple(x.shape), "(index_dim,)", (d,))  # type: ignore[arg-type]
    out_dtype = out_dtype or q_all.dtype
    inputs = (q_all, k, cos, sin, q_norm_weight, k_norm_weight, k_norm_bias)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    options = dict(
        num_heads=num_heads, q_eps=q_eps, k_eps=k_eps, out_dtype=out_dtype, hadamard=hadamard,
        fp8_keys=fp8_keys,
    )  # fmt: skip
    if needs_grad or impl_for(*inputs) != "triton" or torch.float64 in (q_all.dtype, out_dtype):
        return index_prologue_reference(*inputs, **options)
    from keye_dsa.ops.index_prologue.triton_kernel import index_prologue_fwd

    return index_prologue_fwd(*inputs, **options)
