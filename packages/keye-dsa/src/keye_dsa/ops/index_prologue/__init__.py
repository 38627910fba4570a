"""``index_prologue``: the Lightning Indexer between its projections and the top-k (DESIGN §4).

From the fused query projection ``q_all [B,T,H*D+H]`` (``H`` index queries, then their gates) and the
key projection ``k [B,T,D]``: ``q_norm`` (RMSNorm per head) and ``k_norm`` (LayerNorm with bias) in
fp32, neox RoPE or M-RoPE on both, the optional orthonormal Hadamard rotation, the cast to
``out_dtype``, and with ``fp8_keys`` the key's e4m3 quantization (one fp32 scale per key, as
``quantize_index_keys``). A Triton kernel on CUDA does it in one launch, rotary angles included (a decode
step's prologue was ~40 PyTorch launches of a few KB each); it is forward only, so while autograd needs
the result (training the indexer) the reference runs.
"""

from __future__ import annotations

import torch

from keye_dsa._checks import check_float, check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.index_prologue.reference import index_prologue_reference
from keye_dsa.rope import check_positions


def index_prologue(
    q_all: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    *,
    num_heads: int,
    q_eps: float,
    k_eps: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    rope_theta: float | None = None,
    sections: list[int] | None = None,
    out_dtype: torch.dtype | None = None,
    hadamard: bool = False,
    fp8_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q_index [B,T,H,D], k_index [B,T,D], weights [B,T,H] fp32, k_scale)``.

    The rotation: ready-made ``rope = (cos, sin)`` broadcasting to ``[B,T,D]``, or ``position_ids``
    (``[B,T]``, or ``[3,B,T]`` with the 3 M-RoPE ``sections`` of ``D / 2`` frequencies) and
    ``rope_theta``, as ``rope_cos_sin`` turns them into angles. ``out_dtype`` (default ``q_all``'s) is
    the queries' and keys' dtype; with ``fp8_keys`` the keys are ``torch.float8_e4m3fn`` and ``k_scale
    [B,T]`` fp32 their scales (else ``None``)."""
    check_rank("q_all", q_all, 3, "[batch, seq, heads * index_dim + heads]")
    check_rank("k", k, 3, "[batch, seq, index_dim]")
    check_float("q_all", q_all)
    check_float("k", k)
    batch, t, width = q_all.shape
    d = k.shape[-1]
    check_same("k.shape[:2]", tuple(k.shape[:2]), "q_all.shape[:2]", (batch, t))  # type: ignore[arg-type]
    check_same("q_all.shape[-1]", width, "heads * (index_dim + 1)", num_heads * (d + 1))
    if d % 2:
        raise ValueError(f"index_dim must be even (RoPE); got {d}")
    if hadamard and d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two index_dim; got {d}")
    _check_rotation(rope, position_ids, rope_theta, sections, batch, t, d)
    for name, x in (
        ("q_norm_weight", q_norm_weight),
        ("k_norm_weight", k_norm_weight),
        ("k_norm_bias", k_norm_bias),
    ):
        check_same(f"{name}.shape", tuple(x.shape), "(index_dim,)", (d,))  # type: ignore[arg-type]
    out_dtype = out_dtype or q_all.dtype
    inputs = (q_all, k, q_norm_weight, k_norm_weight, k_norm_bias)
    options = dict(
        num_heads=num_heads, q_eps=q_eps, k_eps=k_eps, out_dtype=out_dtype, rope=rope,
        position_ids=position_ids, rope_theta=rope_theta, sections=sections, hadamard=hadamard,
        fp8_keys=fp8_keys,
    )  # fmt: skip
    tensors = (*inputs, *(rope or (position_ids,)))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if needs_grad or impl_for(*tensors) != "triton" or torch.float64 in (q_all.dtype, out_dtype):
        return index_prologue_reference(*inputs, **options)
    from keye_dsa.ops.index_prologue.triton_kernel import index_prologue_fwd

    return index_prologue_fwd(*inputs, **options)


def _check_rotation(rope, position_ids, rope_theta, sections, batch: int, t: int, d: int) -> None:
    """Exactly one of ``rope`` (cos and sin broadcasting to ``[B,T,D]``) and ``position_ids``."""
    if (rope is None) == (position_ids is None):
        raise ValueError(
            "pass the rotation as rope=(cos, sin) or as position_ids (with rope_theta), not both"
        )
    if rope is not None:
        for name, x in zip(("cos", "sin"), rope):
            check_float(name, x)
            shape = (1,) * (3 - x.dim()) + tuple(x.shape)
            if (
                len(shape) != 3
                or any(n not in (1, want) for n, want in zip(shape, (batch, t)))
                or shape[2] != d
            ):
                raise ValueError(
                    f"{name} must broadcast to [batch, seq, {d}] = {[batch, t, d]}; got {list(x.shape)}"
                )
        return
    check_positions(position_ids, d, sections)
    if (
        position_ids.shape[-2] not in (1, batch)
        or position_ids.shape[-1] != t
        or position_ids.is_floating_point()
    ):
        raise ValueError(
            f"position_ids must be integer [{batch} or 1, {t}] or [3, {batch} or 1, {t}]; got "
            f"{position_ids.dtype} {list(position_ids.shape)}"
        )
    if rope_theta is None or rope_theta <= 1:
        raise ValueError(f"rope_theta must be a number > 1 with position_ids; got {rope_theta}")
