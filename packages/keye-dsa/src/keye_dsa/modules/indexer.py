"""``LightningIndexer``: the per-layer scorer that picks each query's top-k keys (DESIGN §4)."""

from __future__ import annotations

import torch
from torch import nn

from keye_dsa.ops.index_prologue import index_prologue
from keye_dsa.ops.indexer_topk import select_topk
from keye_dsa.ops.indexer_topk.decode import dequantize_index_keys, select_topk_decode
from keye_dsa.rope import scale_sections

MODES = ("off", "dense_warmup", "sparse")
# Queries per row up to which selection takes the decode kernels (each of their queries streams the keys).
DECODE_ROWS = 16


class LightningIndexer(nn.Module):
    """MQA-style indexer with the released Keye names ``q_proj``, ``k_proj``, ``q_norm``, ``k_norm``.

    ``q_proj: hidden -> H*D + H`` yields ``H`` index queries and their gates; ``k_proj: hidden -> D``
    yields one index key per token. ``q_norm`` (RMSNorm per head) and ``k_norm`` (LayerNorm with bias)
    run in fp32, then RoPE (M-RoPE for 3-D positions, sections scaled by ``D / decoder_head_dim``) and an
    optional Hadamard rotation.

    ``mode`` picks the training stage for the attention that owns this indexer: ``"sparse"`` (default:
    top-k sparse attention, plus the sparse KL when training), ``"dense_warmup"`` (dense attention
    output, dense KL target) or ``"off"`` (plain dense attention, indexer unused).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        head_dim: int = 128,
        topk: int = 2048,
        *,
        rope_theta: float = 1_000_000.0,
        mrope_section: list[int] | None = None,
        decoder_head_dim: int | None = None,
        eps: float = 1e-6,
        hadamard: bool = False,
        mode: str = "sparse",
    ):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"indexer head_dim must be even (RoPE); got {head_dim}")
        self.hidden_size, self.num_heads, self.head_dim, self.topk = hidden_size, num_heads, head_dim, topk
        self.rope_theta = rope_theta
        self.sections = (
            None
            if mrope_section is None
            else scale_sections(list(mrope_section), head_dim, decoder_head_dim or 2 * sum(mrope_section))
        )
        self.hadamard = hadamard
        self.mode = mode
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim + num_heads, bias=False)
        self.k_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, eps=eps)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"indexer mode must be one of {MODES}; got {value!r}")
        self._mode = value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [B,T,hidden]`` -> ``(q_index [B,T,H,D], k_index [B,T,D], weights [B,T,H] fp32)``.

        Rotary angles come from ``position_ids`` (``[B,T]`` or ``[3,B,T]``), or ready-made ``rope``
        ``(cos, sin)`` of width ``D`` (e.g. the decoder's own, when its head_dim equals ``D``).
        """
        q_index, k_index, weights, _ = self.project(hidden_states, position_ids, rope)
        return q_index, k_index, weights

    def project(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        fp8_keys: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward``'s three outputs and the keys' FP8 scales: with ``fp8_keys``, ``k_index`` comes
        quantized for an FP8 cache (``torch.float8_e4m3fn``) with its ``k_scale [B,T]`` (else ``None``),
        in the same launch as the norms and RoPE (``index_prologue``)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [batch, seq, {self.hidden_size}]; got {tuple(hidden_states.shape)}"
            )
        batch, t, _ = hidden_states.shape
        if rope is None and position_ids is None:
            position_ids = torch.arange(t, device=hidden_states.device).expand(batch, t)
        return index_prologue(
            self.q_proj(hidden_states), self.k_proj(hidden_states), self.q_norm.weight, self.k_norm.weight,
            self.k_norm.bias, num_heads=self.num_heads, q_eps=_eps(self.q_norm.eps), k_eps=self.k_norm.eps,
            rope=rope, position_ids=None if rope is not None else position_ids, rope_theta=self.rope_theta,
            sections=self.sections, out_dtype=hidden_states.dtype, hadamard=self.hadamard, fp8_keys=fp8_keys,
        )  # fmt: skip

    def select(
        self,
        q_index: torch.Tensor,
        k_index: torch.Tensor,
        weights: torch.Tensor,
        *,
        key_start: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Top-k key indices (int32, -1 padded); no scoring when no query sees more than top-k keys.

        A few queries (decoding) take ``select_topk_decode``'s kernels; ``k_scale [B,S]`` marks FP8 keys
        (``DSACache(index_dtype=torch.float8_e4m3fn)``), which longer chunks score dequantized.
        ``lengths [B]`` (device): only that many of ``k_index``'s rows are filled (``StaticDSACache``;
        up to ``DECODE_ROWS`` queries)."""
        with torch.no_grad():
            batch, t = q_index.shape[:2]
            if lengths is not None and (cu_seqlens is not None or t > DECODE_ROWS):
                raise ValueError(f"lengths is for up to {DECODE_ROWS} queries per row, without cu_seqlens")
            if cu_seqlens is None and t <= DECODE_ROWS:
                if lengths is None:
                    lengths = torch.full((batch,), k_index.shape[1], dtype=torch.int32, device=q_index.device)
                return select_topk_decode(
                    q_index, k_index, weights, self.topk, lengths, key_start=key_start, k_scale=k_scale,
                    validate=False,
                )  # fmt: skip
            if k_scale is not None:
                k_index = dequantize_index_keys(k_index, k_scale, q_index.dtype)
            if cu_seqlens is not None:
                return select_topk(q_index[0], k_index[0], weights[0], self.topk, cu_seqlens=cu_seqlens)[None]
            return select_topk(q_index, k_index, weights, self.topk, key_start=key_start)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, topk={self.topk}, mode={self.mode!r}"


def _eps(eps: float | None) -> float:
    """``nn.RMSNorm``'s epsilon (``None`` means fp32's machine epsilon: the norm runs in fp32)."""
    return torch.finfo(torch.float32).eps if eps is None else eps


def set_dsa_mode(model: nn.Module, mode: str, *, freeze_decoder: bool | None = None) -> int:
    """Put every ``LightningIndexer`` in ``model`` into ``mode``; returns how many were set.

    ``"dense_warmup"``: dense attention output, indexer trained on the dense KL; by default every
    parameter outside the indexers is frozen (the decoder must not move). ``"sparse"``: top-k sparse
    attention, indexer trained on the sparse KL while the decoder trains on the LM loss (pass
    ``freeze_decoder=False`` to unfreeze it after a warm-up). ``"off"``: plain dense attention.
    ``freeze_decoder`` True/False sets ``requires_grad`` of all non-indexer parameters explicitly.
    """
    indexers = [m for m in model.modules() if isinstance(m, LightningIndexer)]
    if not indexers:
        raise ValueError(
            "set_dsa_mode: the model has no LightningIndexer (patch it with keye_dsa.patch_model)"
        )
    for indexer in indexers:
        indexer.mode = mode
    if freeze_decoder is None and mode == "dense_warmup":
        freeze_decoder = True
    if freeze_decoder is not None:
        owned = {id(p) for m in indexers for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in owned:
                p.requires_grad_(not freeze_decoder)
    for indexer in indexers:
        indexer.requires_grad_(mode != "off")
    return len(indexers)
