"""The Triton experts as an autograd.Function: Triton kernels in both directions.

The Function maps (hidden, topk_weights, gate_up_proj, down_proj) to the MoE output ``[N, H]``: the
down-projection kernel multiplies each row by its routing weight and scatters it to its (token, k) slot
(the un-sort is fused), and ``sum_slots`` adds each token's K rows in one streaming pass. Its backward
gives the routing weights their gradient from the same kernels (see ``TritonExpertsFunction``).
"""

from __future__ import annotations

import functools

import torch
import triton

from keye_moe.experts import check_expert_inputs
from keye_moe.experts.triton import kernels as K
from keye_moe.experts.triton.plan import Plan, make_plan


def pick_block_m(rows: int, num_experts: int) -> int:
    """Rows per tile: large when experts see many tokens (prefill, training), 16 for decoding."""
    if K.INTERPRET:
        return 16
    per_expert = rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 128 else 128


@functools.cache
def _sm_count(device: int) -> int:
    return 4 if K.INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _grid(plan: Plan, n_out: int):
    """A program per (n tile, row block): the backward GEMMs."""
    return lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), plan.num_blocks)


def _persistent_grid(plan: Plan, n_out: int):
    """A program per SM looping over the tiles (never more programs than tiles): the forward GEMMs."""
    sms = _sm_count(plan.row_slot.device.index or 0)
    return lambda meta: (min(sms, plan.num_blocks * triton.cdiv(n_out, meta["BLOCK_N"])),)


def _tune(plan: Plan) -> bool:
    """Autotune only problems big enough to amortize it (training and prefill, not decoding)."""
    return plan.num_blocks * plan.block_m >= 8192


def _grouped_gemm(
    a, b, c, plan, *, n_out, a_mode, b_kn, c_by_slot, epilogue, scale=None, gu=None, act=None, d_scale=None
):
    """``C = A @ B_e`` per row block; B is the stacked weight ``[E, R, C]`` with the reduction along R
    (``b_kn``) or along C."""
    k_red = b.shape[1] if b_kn else b.shape[2]
    K.launch(
        K.grouped_gemm_kernel,
        _grid(plan, n_out),
        a, b, c,
        scale if scale is not None else c,
        gu if gu is not None else c,
        act if act is not None else c,
        d_scale if d_scale is not None else c,
        plan.row_slot, plan.block_expert,
        n_out, k_red, b.shape[0], plan.top_k, b.shape[1], b.shape[2],
        a.stride(0), c.stride(0),
        gu.stride(0) if gu is not None else 0,
        d_scale.stride(0) if d_scale is not None else 0,
        BLOCK_M=plan.block_m, A_MODE=a_mode, B_KN=b_kn, C_BY_SLOT=c_by_slot, EPILOGUE=epilogue,
        IEEE=a.dtype == torch.float32, tune=_tune(plan),
    )  # fmt: skip


def _wgrad(left, right, out, plan, *, l_mode, r_mode, l_scale=None):
    e, m, n = out.shape
    K.launch(
        K.grouped_wgrad_kernel,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), e),
        left, right, out,
        l_scale if l_scale is not None else out,
        plan.row_slot, plan.expert_start, plan.counts,
        m, n, plan.top_k, left.stride(0), right.stride(0), out.stride(0), out.stride(1),
        L_MODE=l_mode, R_MODE=r_mode, L_SCALE=l_scale is not None,
        IEEE=left.dtype == torch.float32, tune=_tune(plan),
    )  # fmt: skip


def gate_up_swiglu(hidden, gate_up_proj, plan: Plan, store_preact: bool):
    """-> (act ``[P, I]``, gate/up pre-activations ``[P, 2I]`` or ``act`` itself), in padded rows."""
    e, two_i, h = gate_up_proj.shape
    rows = plan.num_blocks * plan.block_m
    act = hidden.new_empty(rows, two_i // 2)
    gu = hidden.new_empty(rows, two_i) if store_preact else act
    K.launch(
        K.gate_up_swiglu_kernel,
        _persistent_grid(plan, two_i // 2),
        hidden, gate_up_proj, act, gu, plan.row_slot, plan.block_expert, plan.used_blocks,
        h, two_i // 2, e, plan.top_k, hidden.stride(0), act.stride(0), gu.stride(0),
        BLOCK_M=plan.block_m, STORE_PREACT=store_preact, TMA=K.tma_ok(gate_up_proj),
        IEEE=hidden.dtype == torch.float32, tune=_tune(plan),
    )  # fmt: skip
    return act, gu


def down_scatter(act, topk_weights, down_proj, plan: Plan):
    """-> ``[N*K, H]``: each row's down projection times its routing weight, in slot order."""
    e, h, i = down_proj.shape
    y = act.new_empty(topk_weights.numel(), h)
    if K.tma_ok(act, down_proj):
        K.launch(
            K.down_scatter_kernel,
            _persistent_grid(plan, h),
            act, down_proj, y, topk_weights, plan.row_slot, plan.block_expert, plan.used_blocks,
            act.shape[0], h, i, e, y.stride(0),
            BLOCK_M=plan.block_m, IEEE=act.dtype == torch.float32, tune=_tune(plan),
        )  # fmt: skip
        return y
    _grouped_gemm(
        act, down_proj, y, plan, n_out=down_proj.shape[1], a_mode=K.PADDED, b_kn=False, c_by_slot=True,
        epilogue=K.SCALE, scale=topk_weights,
    )  # fmt: skip
    return y


def sum_slots(y: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[N*K, H]`` slot rows -> ``[N, H]``, summing each token's K rows."""
    n, h = y.shape[0] // top_k, y.shape[1]
    out = y.new_empty(n, h)
    block_h = min(1024, triton.next_power_of_2(h))
    grid = (triton.cdiv(n, 2), triton.cdiv(h, block_h))
    K.slot_sum_kernel[grid](y, out, n, h, TOP_K=top_k, BLOCK_T=2, BLOCK_H=block_h, num_warps=4)
    return out


class TritonExpertsFunction(torch.autograd.Function):
    """(hidden, topk_weights, gate_up_proj, down_proj) -> the routed MoE output ``[N, H]``.

    The down-projection kernel scales each row by its routing weight and writes it to its slot; the sum
    over the K slots of a token is a plain reduction. Backward reads dOut by token (no ``[N*K, H]``
    expansion) and gets the routing-weight gradient ``<dOut[token], y[slot]> = <dOut[token] @ down_e,
    act[slot]>`` from the dAct kernel's epilogue.
    """

    @staticmethod
    def forward(ctx, hidden, topk_weights, gate_up_proj, down_proj, plan: Plan):  # type: ignore[override]
        needs_grad = any(ctx.needs_input_grad[:4])
        act, gu = gate_up_swiglu(hidden, gate_up_proj, plan, store_preact=needs_grad)
        y = down_scatter(act, topk_weights, down_proj, plan)
        if needs_grad:
            ctx.save_for_backward(hidden, topk_weights, gate_up_proj, down_proj, act, gu)
            ctx.plan = plan
        return sum_slots(y, plan.top_k)

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        hidden, topk_weights, gate_up_proj, down_proj, act, gu = ctx.saved_tensors
        plan: Plan = ctx.plan
        d_out = d_out.contiguous()
        n, h = hidden.shape
        i = gate_up_proj.shape[1] // 2
        d_gu = torch.empty_like(gu)
        min_block_n = min(c.kwargs["BLOCK_N"] for c in K.grouped_gemm_kernel.configs)
        d_w_parts = torch.zeros(triton.cdiv(i, min_block_n), n * plan.top_k, device=hidden.device)
        _grouped_gemm(
            d_out, down_proj, d_gu, plan, n_out=i, a_mode=K.BY_TOKEN, b_kn=True, c_by_slot=False,
            epilogue=K.SWIGLU_BWD, scale=topk_weights, gu=gu, act=act, d_scale=d_w_parts,
        )  # fmt: skip
        need_x, need_w, need_gate_up, need_down = ctx.needs_input_grad[:4]  # frozen experts skip wgrads
        d_w = d_w_parts.sum(0).view(n, plan.top_k).to(topk_weights.dtype) if need_w else None
        d_down = d_gate_up = dx = None
        if need_down:
            d_down = torch.empty_like(down_proj)
            _wgrad(d_out, act, d_down, plan, l_mode=K.BY_TOKEN, r_mode=K.PADDED, l_scale=topk_weights)
        if need_gate_up:
            d_gate_up = torch.empty_like(gate_up_proj)
            _wgrad(d_gu, hidden, d_gate_up, plan, l_mode=K.PADDED, r_mode=K.BY_TOKEN)
        if need_x:
            dx_slots = hidden.new_empty(n * plan.top_k, h)
            _grouped_gemm(
                d_gu, gate_up_proj, dx_slots, plan, n_out=h, a_mode=K.PADDED, b_kn=True, c_by_slot=True,
                epilogue=K.PLAIN,
            )  # fmt: skip
            dx = sum_slots(dx_slots, plan.top_k)
        return dx, d_w, d_gate_up, d_down, None


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
    return TritonExpertsFunction.apply(
        hidden.contiguous(),
        topk_weights.contiguous(),
        gate_up_proj.contiguous(),
        down_proj.contiguous(),
        plan,
    )


class TritonExperts:
    def __call__(self, hidden, topk_ids, topk_weights, gate_up_proj, down_proj):
        return triton_experts(hidden, topk_ids, topk_weights, gate_up_proj, down_proj)
