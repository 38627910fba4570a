"""The Qwen3-MoE router, the Switch load-balancing statistics and the aux-loss-free expert bias.

Routing is exactly transformers' ``Qwen3MoeTopKRouter``: logits in the model dtype, softmax in fp32,
top-k, renormalize when ``norm_topk_prob``, weights cast back to the logits' dtype. With
``expert_bias`` on (DeepSeek-V3's aux-loss-free balancing), a per-expert bias is added to the
probabilities for *selection only*; the weights still come from the unbiased probabilities. The bias is
a persistent buffer (``mlp.gate.e_score_correction_bias``) updated outside autograd by
``update_bias``, from the token counts the model records while training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from keye_moe.layers.topk_softmax import reference_topk_softmax, route


@dataclass
class RouterStats:
    """Per-layer sums that the Switch loss needs; summed over layers before the loss is formed."""

    tokens_per_expert: torch.Tensor  # [E] fp32: top-k assignments (weighted by the token mask)
    prob_per_expert: torch.Tensor  # [E] fp32: summed router probabilities
    rows: torch.Tensor  # scalar fp32: number of (real) tokens


class Router(nn.Module):
    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool, expert_bias: bool
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        if expert_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
            self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        else:
            self.e_score_correction_bias = None
            self.expert_load = None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep the balancing state in fp32 whatever dtype the model is cast to (small updates)."""
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "expert_load"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32 and not buf.is_meta:
                setattr(self, name, buf.float())
        return self

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None, need_stats: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, RouterStats | None]:
        """hidden ``[N, H]`` -> (topk_ids ``[N, K]``, topk_weights ``[N, K]``, stats or None).

        On CUDA the whole router (logits GEMM, softmax, top-k, statistics) is one Triton kernel
        (``route``); elsewhere the PyTorch reference. Statistics cost a little per layer; decoding skips
        them (``need_stats=False``).
        """
        bias = self.e_score_correction_bias
        if hidden.is_cuda:
            mask = token_mask.reshape(-1) if token_mask is not None else None
            weight = self.weight
            if torch.is_autocast_enabled(hidden.device.type):  # as F.linear would: both in autocast's dtype
                dtype = torch.get_autocast_dtype(hidden.device.type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            ids, weights, counts, prob_sum, _ = route(
                hidden, weight, self.top_k, self.norm_topk_prob, bias, mask, need_stats
            )
            if not need_stats:
                return ids, weights, None
            rows = (
                mask.float().sum()
                if mask is not None
                else torch.full((), float(len(hidden)), device=hidden.device)
            )
            return ids, weights, RouterStats(counts, prob_sum, rows)
        logits = F.linear(hidden, self.weight)
        top_ids, top_w, probs = reference_topk_softmax(logits, self.top_k, self.norm_topk_prob, bias)
        return top_ids, top_w, self._stats(probs, top_ids, token_mask) if need_stats else None

    @torch.no_grad()
    def record_load(self, stats: RouterStats) -> None:
        """Add one forward pass's assignments to the load that ``update_bias`` balances. The model calls
        this once per step (not the router itself, so activation recomputation never counts twice)."""
        if self.expert_load is not None:
            self.expert_load += stats.tokens_per_expert

    def _stats(self, probs: torch.Tensor, top_ids: torch.Tensor, mask: torch.Tensor | None) -> RouterStats:
        e = self.num_experts
        if mask is None:
            ones = torch.ones(top_ids.numel(), dtype=torch.float, device=probs.device)
            counts = torch.zeros(e, dtype=torch.float, device=probs.device).index_add_(
                0, top_ids.reshape(-1), ones
            )
            rows = torch.full((), float(probs.shape[0]), device=probs.device)  # a fill, not a host copy
            return RouterStats(counts, probs.sum(0), rows)
        m = mask.reshape(-1).float()
        counts = torch.zeros(e, dtype=torch.float, device=probs.device).index_add_(
            0, top_ids.reshape(-1), m.repeat_interleave(self.top_k)
        )
        return RouterStats(counts, (probs * m[:, None]).sum(0), m.sum())

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.e_score_correction_bias is None or self.expert_load is None:
            raise RuntimeError("update_bias needs DecoderConfig.expert_bias=True")
        load = self.expert_load
        if load.sum() > 0:
            self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()


def switch_aux_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func``: E * sum_e f_e * P_e with f and P averaged over all
    layers' rows together (not a mean of per-layer losses)."""
    tokens = torch.stack([s.tokens_per_expert for s in stats]).sum(0)
    probs = torch.stack([s.prob_per_expert for s in stats]).sum(0)
    rows = torch.stack([s.rows for s in stats]).sum()
    return (tokens / rows * (probs / rows)).sum() * num_experts
