"""The Triton experts as an autograd.Function: Triton kernels in both directions.

The Function maps (hidden, gate_up_proj, down_proj) to the *unweighted* expert output of every
(token, k) slot, ``[N*K, H]``, written straight to slot order by the down-projection kernel (the scatter
is fused). The routing-weighted sum over k is a batched matmul in plain PyTorch, so autograd gives the
router weights their gradient without another kernel.
"""

from __future__ import annotations

import torch
import triton

from keye_moe.experts import check_expert_inputs
from keye_moe.experts.routing import weighted_sum
from keye_moe.experts.triton import kernels as K
from keye_moe.experts.triton.plan import Plan, make_plan


def pick_block_m(rows: int, num_experts: int) -> int:
    """Rows per tile: large when experts see many tokens (prefill, training), 16 for decoding."""
    if K.INTERPRET:
        return 16
    per_expert = rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 128 else 128


def _grid(plan: Plan, n_out: int):
    return lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), plan.num_blocks)


def _tune(plan: Plan) -> bool:
    """Autotune only problems big enough to amortize it (training and prefill, not decoding)."""
    return plan.num_blocks * plan.block_m >= 8192


def _grouped_gemm(a, b, c, plan, *, n_out, k_red, stride_bk, stride_bn, a_by_slot, c_by_slot, gu=None):
    K.launch(
        K.grouped_gemm_kernel,
        _grid(plan, n_out),
        a,
        b,
        c,
        gu if gu is not None else c,
        plan.row_slot,
        plan.block_expert,
        n_out,
        k_red,
        b.shape[0],
        a.stride(0),
        b.stride(0),
        stride_bk,
        stride_bn,
        c.stride(0),
        gu.stride(0) if gu is not None else 0,
        BLOCK_M=plan.block_m,
        A_BY_SLOT=a_by_slot,
        C_BY_SLOT=c_by_slot,
        SWIGLU_BWD=gu is not None,
        IEEE=a.dtype == torch.float32,
        tune=_tune(plan),
    )


def _wgrad(left, right, out, plan, *, l_mode, r_mode):
    e, m, n = out.shape
    K.launch(
        K.grouped_wgrad_kernel,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), e),
        left,
        right,
        out,
        plan.row_slot,
        plan.expert_start,
        plan.counts,
        m,
        n,
        plan.top_k,
        left.stride(0),
        right.stride(0),
        out.stride(0),
        out.stride(1),
        L_MODE=l_mode,
        R_MODE=r_mode,
        IEEE=left.dtype == torch.float32,
        tune=_tune(plan),
    )


class TritonExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, gate_up_proj, down_proj, plan: Plan):  # type: ignore[override]
        n, h = hidden.shape
        e, two_i, _ = gate_up_proj.shape
        i = two_i // 2
        rows = plan.num_blocks * plan.block_m
        needs_grad = any(ctx.needs_input_grad[:3])
        act = hidden.new_empty(rows, i)
        gu = hidden.new_empty(rows, two_i) if needs_grad else act
        K.launch(
            K.gate_up_swiglu_kernel,
            _grid(plan, i),
            hidden,
            gate_up_proj,
            act,
            gu,
            plan.row_slot,
            plan.block_expert,
            h,
            i,
            e,
            plan.top_k,
            hidden.stride(0),
            gate_up_proj.stride(0),
            gate_up_proj.stride(1),
            act.stride(0),
            gu.stride(0),
            BLOCK_M=plan.block_m,
            STORE_PREACT=needs_grad,
            IEEE=hidden.dtype == torch.float32,
            tune=_tune(plan),
        )
        y = hidden.new_empty(n * plan.top_k, h)
        _grouped_gemm(
            act, down_proj, y, plan, n_out=h, k_red=i,
            stride_bk=down_proj.stride(2), stride_bn=down_proj.stride(1), a_by_slot=False, c_by_slot=True,
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(hidden, gate_up_proj, down_proj, act, gu)
            ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        hidden, gate_up_proj, down_proj, act, gu = ctx.saved_tensors
        plan: Plan = ctx.plan
        dy = dy.contiguous()
        n, h = hidden.shape
        two_i = gate_up_proj.shape[1]
        i = two_i // 2
        d_gu = torch.empty_like(gu)
        _grouped_gemm(
            dy, down_proj, d_gu, plan, n_out=i, k_red=h, gu=gu,
            stride_bk=down_proj.stride(1), stride_bn=down_proj.stride(2), a_by_slot=True, c_by_slot=False,
        )  # fmt: skip
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]  # frozen experts skip their wgrads
        d_down = d_gate_up = dx = None
        if need_down:
            d_down = torch.empty_like(down_proj)
            _wgrad(dy, act, d_down, plan, l_mode=K.BY_SLOT, r_mode=K.PADDED)
        if need_gate_up:
            d_gate_up = torch.empty_like(gate_up_proj)
            _wgrad(d_gu, hidden, d_gate_up, plan, l_mode=K.PADDED, r_mode=K.BY_TOKEN)
        if need_x:
            dx_slots = hidden.new_empty(n * plan.top_k, h)
            _grouped_gemm(
                d_gu, gate_up_proj, dx_slots, plan, n_out=h, k_red=two_i, a_by_slot=False, c_by_slot=True,
                stride_bk=gate_up_proj.stride(1), stride_bn=gate_up_proj.stride(2),
            )  # fmt: skip
            dx = dx_slots.view(n, plan.top_k, h).sum(1, dtype=torch.float32).to(hidden.dtype)
        return dx, d_gate_up, d_down, None


def triton_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    check_expert_inputs(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
    if not hidden.is_cuda and not K.INTERPRET:
        raise RuntimeError(
            "the 'triton' expert backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import, "
            f"a slow CPU interpreter for tests); got hidden on {hidden.device}"
        )
    if hidden.shape[0] == 0:
        return hidden.new_zeros(hidden.shape) + 0 * (gate_up_proj.sum() + down_proj.sum())
    plan = make_plan(topk_ids, gate_up_proj.shape[0], pick_block_m(topk_ids.numel(), gate_up_proj.shape[0]))
    y = TritonExpertsFunction.apply(
        hidden.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous(), plan
    )
    return weighted_sum(y, topk_weights)


class TritonExperts:
    def __call__(self, hidden, topk_ids, topk_weights, gate_up_proj, down_proj):
        return triton_experts(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
