"""Grouped-GEMM kernels over the padded dispatch of ``plan.py``.

Four kernels cover the forward and backward passes:
- ``gate_up_swiglu_kernel``: gathers token rows of ``x`` by slot, multiplies by the expert's gate and up
  rows (two accumulators) and writes ``silu(gate) * up`` (and, for backward, the pre-activations).
- ``down_scatter_kernel`` (TMA-capable GPUs): the forward down projection, each row times its routing
  weight, written to its slot.
- ``grouped_gemm_kernel``: ``C = A @ B_e`` per row block, where A rows are read in padded order or
  gathered by slot or token, C rows are written in padded order or scattered to their slot, and the
  epilogue may scale rows by their routing weight or (backward) turn dOut @ down_e into d(gate, up) and
  the routing-weight gradient. It is the backward's dAct and dx GEMM, and the forward down projection
  where TMA is unavailable.
- ``grouped_wgrad_kernel``: per expert, ``dW_e = L_e^T @ R_e`` reducing over that expert's rows, with L
  and R each read in padded order, by slot, or by token (L optionally scaled by the routing weight).
Accumulation is fp32. Tiles are ordered with the N tiles of one row block next to each other so the
gathered A rows and the expert's weights stay in L2. The two forward kernels run a persistent grid (a
program per SM looping over the tiles of the used row blocks); on Hopper they read the weights (and the
down kernel its padded A rows) by TMA from device-side descriptors over the stacked experts. The backward
kernels launch a program per tile with pointer loads (the persistent, flattened form measured slower
there, BENCHMARKS.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PADDED, BY_SLOT, BY_TOKEN = 0, 1, 2  # how a kernel finds an operand's row: padded row, slot, token
PLAIN, SCALE, SWIGLU_BWD = 0, 1, 2  # grouped_gemm_kernel epilogues
_PADDED, _BY_SLOT, _BY_TOKEN = tl.constexpr(PADDED), tl.constexpr(BY_SLOT), tl.constexpr(BY_TOKEN)
_SCALE, _SWIGLU_BWD = tl.constexpr(SCALE), tl.constexpr(SWIGLU_BWD)


def _configs(shapes: list[tuple[int, ...]], block_names: tuple[str, ...]) -> list[triton.Config]:
    """Autotuning candidates; the first is also the fixed choice for small problems (no tuning cost)."""
    if INTERPRET:
        return [triton.Config(dict.fromkeys(block_names, 16), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(block_names, blocks)), num_warps=warps, num_stages=stages)
        for *blocks, warps, stages in shapes
    ]


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA bulk copies can read these tensors: Hopper or newer (or the interpreter), 16-byte
    aligned base and row strides."""
    if not INTERPRET and not (
        tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9
    ):
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the TMA descriptors that kernels build on the device."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def launch(kernel, grid, *args, tune: bool, **meta) -> None:
    """Launch an autotuned kernel, or (small problems, decoding) its first config without tuning."""
    triton.set_allocator(_scratch)  # a context variable: cheap, and set in whichever thread launches
    if tune and not INTERPRET:
        kernel[grid](*args, **meta)
        return
    config = kernel.configs[0]
    kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _row_index(rows, slot, MODE: tl.constexpr, TOP_K):
    if MODE == _BY_SLOT:
        return slot.to(tl.int64)
    elif MODE == _BY_TOKEN:
        return (slot // TOP_K).to(tl.int64)
    else:
        return rows.to(tl.int64)


@triton.jit
def _weight_tile(desc, e, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert e's ``[BLOCK_K, BLOCK_N]`` tile of ``w [E, N, K]`` at reduction offset k0, output offset n0,
    by TMA from a 3-D descriptor (so it never reads the next expert's rows; zeros outside)."""
    return tl.trans(desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))


@triton.jit
def _block_rows(block_expert_ptr, row_slot_ptr, tile, num_tiles, n_tiles, BLOCK_M: tl.constexpr):
    """Expert and slots of ``tile``'s row block (expert 0 and no rows past the last tile)."""
    pid_m = tile // n_tiles
    live = tile < num_tiles
    e = tl.load(block_expert_ptr + pid_m, mask=live, other=0)
    slot = tl.load(row_slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M), mask=live, other=-1)
    return e, slot


@triton.autotune(
    configs=_configs(
        [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 5), (128, 64, 8, 4)], ("BLOCK_N", "BLOCK_K")
    ),
    key=["H", "I", "BLOCK_M", "STORE_PREACT"],  # training's heavier epilogue may want another tile
)
@triton.jit
def gate_up_swiglu_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    gu_ptr,
    row_slot_ptr,
    block_expert_ptr,
    used_blocks_ptr,
    H,
    I,
    E,
    TOP_K,
    stride_x,
    stride_act,
    stride_gu,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    TMA: tl.constexpr,
    IEEE: tl.constexpr,
):
    """A persistent loop over the (row block, n tile) tiles, n fastest, so that the programs running
    together share the gathered rows and the expert's weights in L2. Each tile's expert and slots are
    loaded during the previous tile, so its row gather starts at once. (Flattening the tile and k loops
    into one pipelined loop made this kernel slower on the H200, BENCHMARKS.md.)"""
    n_tiles = tl.cdiv(I, BLOCK_N)
    num_tiles = tl.load(used_blocks_ptr) * n_tiles
    k_tiles = tl.cdiv(H, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    if TMA:
        desc = tl.make_tensor_descriptor(w_ptr, [E, 2 * I, H], [2 * I * H, H, 1], [1, BLOCK_N, BLOCK_K])
    step = tl.num_programs(0)
    e_next, slot_next = _block_rows(
        block_expert_ptr, row_slot_ptr, tl.program_id(0), num_tiles, n_tiles, BLOCK_M
    )
    for tile in range(tl.program_id(0), num_tiles, step):
        pid_m = tile // n_tiles
        n0 = (tile % n_tiles) * BLOCK_N
        e, slot = e_next, slot_next
        e_next, slot_next = _block_rows(
            block_expert_ptr, row_slot_ptr, tile + step, num_tiles, n_tiles, BLOCK_M
        )
        valid = slot >= 0
        tok = tl.where(valid, slot // TOP_K, 0).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            k_mask = offs_k + k0 < H
            a = tl.load(
                x_ptr + tok[:, None] * stride_x + (k0 + offs_k)[None, :],
                mask=valid[:, None] & k_mask[None, :],
                other=0.0,
            )
            if TMA:
                wg = _weight_tile(desc, e, n0, k0, BLOCK_N, BLOCK_K)
                wu = _weight_tile(desc, e, I + n0, k0, BLOCK_N, BLOCK_K)
            else:
                wg_ptrs = w_ptr + e.to(tl.int64) * 2 * I * H + offs_n[None, :] * H + (k0 + offs_k)[:, None]
                w_mask = k_mask[:, None] & (offs_n < I)[None, :]
                wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
                wu = tl.load(wg_ptrs + I * H, mask=w_mask, other=0.0)
            acc_g = _mma(a, wg, acc_g, IEEE)
            acc_u = _mma(a, wu, acc_u, IEEE)
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        rows64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        n_mask = (offs_n < I)[None, :]
        tl.store(
            act_ptr + rows64 * stride_act + offs_n[None, :], act.to(act_ptr.dtype.element_ty), mask=n_mask
        )
        if STORE_PREACT:
            gu = gu_ptr + rows64 * stride_gu + offs_n[None, :]
            tl.store(gu, acc_g.to(gu_ptr.dtype.element_ty), mask=n_mask)
            tl.store(gu + I, acc_u.to(gu_ptr.dtype.element_ty), mask=n_mask)


@triton.autotune(
    configs=_configs([(128, 64, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4)], ("BLOCK_N", "BLOCK_K")),
    key=["N_OUT", "K_RED", "BLOCK_M", "A_MODE", "EPILOGUE"],
)
@triton.jit
def grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    scale_ptr,
    gu_ptr,
    act_ptr,
    dscale_ptr,
    row_slot_ptr,
    block_expert_ptr,
    N_OUT,
    K_RED,
    E,
    TOP_K,
    B_ROWS,
    B_COLS,
    stride_a,
    stride_c,
    stride_gu,
    stride_ds,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_MODE: tl.constexpr,
    B_KN: tl.constexpr,
    C_BY_SLOT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    slot64 = tl.where(valid, slot, 0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    a_rows = _row_index(rows, slot64, A_MODE, TOP_K)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * B_ROWS * B_COLS
    if B_KN:
        b_ptrs += offs_k[:, None] * B_COLS + offs_n[None, :]
    else:
        b_ptrs += offs_k[:, None] + offs_n[None, :] * B_COLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_RED, BLOCK_K):
        k_mask = offs_k + k0 < K_RED
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_ptrs += BLOCK_K
        if B_KN:
            b_ptrs += BLOCK_K * B_COLS
        else:
            b_ptrs += BLOCK_K
        acc = _mma(a, b, acc, IEEE)
    if EPILOGUE == _SWIGLU_BWD:
        # acc = dOut[token] @ down_e: the unweighted d(act) of columns n < I (= N_OUT). This tile's share
        # of the routing-weight gradient is sum_n acc * act; then d(act) = w * acc goes through SwiGLU's
        # derivative: d(gate) to column n, d(up) to column I + n.
        act = tl.load(act_ptr + rows64[:, None] * N_OUT + offs_n[None, :], mask=n_mask[None, :], other=0.0)
        d_scale = tl.sum(acc * act.to(tl.float32), 1)
        tl.store(dscale_ptr + pid_n * stride_ds + slot64, d_scale, mask=valid)
        acc *= tl.load(scale_ptr + slot64, mask=valid, other=0.0).to(tl.float32)[:, None]
        gu = gu_ptr + rows64[:, None] * stride_gu + offs_n[None, :]
        g = tl.load(gu, mask=n_mask[None, :], other=0.0).to(tl.float32)
        u = tl.load(gu + N_OUT, mask=n_mask[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        d_gate = acc * u * sig * (1.0 + g * (1.0 - sig))
        d_up = acc * g * sig
        c = c_ptr + rows64[:, None] * stride_c + offs_n[None, :]
        tl.store(c, d_gate.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])
        tl.store(c + N_OUT, d_up.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])
    else:
        if EPILOGUE == _SCALE:
            acc *= tl.load(scale_ptr + slot64, mask=valid, other=0.0).to(tl.float32)[:, None]
        if C_BY_SLOT:
            c = c_ptr + slot64[:, None] * stride_c + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])
        else:
            c = c_ptr + rows64[:, None] * stride_c + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.autotune(
    configs=_configs([(128, 64, 8, 3), (256, 64, 8, 4), (256, 64, 8, 3)], ("BLOCK_N", "BLOCK_K")),
    key=["H", "I", "BLOCK_M"],
)
@triton.jit
def down_scatter_kernel(
    act_ptr,
    w_ptr,
    y_ptr,
    scale_ptr,
    row_slot_ptr,
    block_expert_ptr,
    used_blocks_ptr,
    ROWS,
    H,
    I,
    E,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Forward down projection on TMA-capable GPUs: ``y[slot] = w[slot] * act[row] @ down_e^T``.

    A persistent loop over (row block, n tile) tiles like ``gate_up_swiglu_kernel``, but with the tile
    and k loops flattened into one pipelined loop (the reduction is short, I = 768: the next tile's loads
    overlap this one's epilogue); ``act`` rows (in padded order) and the weights arrive by TMA. Elsewhere
    ``grouped_gemm_kernel`` does this product with pointer loads."""
    n_tiles = tl.cdiv(H, BLOCK_N)
    num_tiles = tl.load(used_blocks_ptr) * n_tiles
    k_tiles = tl.cdiv(I, BLOCK_K)
    a_desc = tl.make_tensor_descriptor(act_ptr, [ROWS, I], [I, 1], [BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, [E, H, I], [H * I, I, 1], [1, BLOCK_N, BLOCK_K])
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m = tile // n_tiles
        n0 = (tile % n_tiles) * BLOCK_N
        e = tl.load(block_expert_ptr + pid_m)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            acc = _mma(a, _weight_tile(w_desc, e, n0, ki * BLOCK_K, BLOCK_N, BLOCK_K), acc, IEEE)
        slot = tl.load(row_slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = slot >= 0
        slot64 = tl.where(valid, slot, 0).to(tl.int64)
        acc *= tl.load(scale_ptr + slot64, mask=valid, other=0.0).to(tl.float32)[:, None]
        offs_n = n0 + tl.arange(0, BLOCK_N)
        y = y_ptr + slot64[:, None] * stride_y + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < H)[None, :])


@triton.autotune(
    configs=_configs(
        [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)],
        ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    ),
    key=["M", "N", "L_MODE", "R_MODE", "L_SCALE"],
)
@triton.jit
def grouped_wgrad_kernel(
    l_ptr,
    r_ptr,
    dw_ptr,
    scale_ptr,
    row_slot_ptr,
    expert_start_ptr,
    counts_ptr,
    M,
    N,
    TOP_K,
    stride_l,
    stride_r,
    stride_de,
    stride_dm,
    L_MODE: tl.constexpr,
    R_MODE: tl.constexpr,
    L_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(counts_ptr + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_K):
        local = r0 + tl.arange(0, BLOCK_K)
        r_mask = local < count
        rows = start + local
        slot = tl.load(row_slot_ptr + rows, mask=r_mask, other=0)
        l_rows = _row_index(rows, slot, L_MODE, TOP_K)
        r_rows = _row_index(rows, slot, R_MODE, TOP_K)
        lt = tl.load(
            l_ptr + l_rows[None, :] * stride_l + offs_m[:, None],
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if L_SCALE:  # L rows times the routing weight of their slot (dOut[token] -> dY[slot])
            w = tl.load(scale_ptr + slot, mask=r_mask, other=0.0).to(tl.float32)
            lt = (lt.to(tl.float32) * w[None, :]).to(l_ptr.dtype.element_ty)
        rt = tl.load(
            r_ptr + r_rows[:, None] * stride_r + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = _mma(lt, rt, acc, IEEE)
    dw = dw_ptr + e.to(tl.int64) * stride_de + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def slot_sum_kernel(y_ptr, out_ptr, N, H, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[n] = sum_k y[n * K + k]`` in fp32, k in order: a streaming pass with K loads in flight."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tok < N)[:, None] & (cols < H)[None, :]
    rows = y_ptr + tok[:, None] * TOP_K * H + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(rows + k * H, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tok[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
