"""The union path of sparse attention (per 64-query block: key union + membership masks) against the
reference and the per-query kernel: plan, forward, LSE, dQ/dK/dV, fallback blocks, varlen."""

import pytest
import torch

from keye_dsa import sparse_attention, sparse_attention_varlen
from keye_dsa.ops.sparse_attention import union, varlen_to_absolute
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference
from keye_dsa.ops.sparse_attention.union import QB, build_union_plan, plan_for, union_plan_reference
from keye_dsa.ops.sparse_attention.union_kernel import slice_queries
from keye_dsa.testing import TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def overlapping_indices(batch, t, s, topk, pool, seed, empty=0.2):
    """Distinct indices per query drawn from a pool shared by its 64-query block, some slots -1 (and all
    slots -1 when ``topk > pool``'s draw runs out). Batch row 1 (if any) only uses keys from ``s // 3`` on
    (a later key start) and its last 5 queries are padding (no key at all)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((batch, t, topk), -1, dtype=torch.int32)
    for b in range(batch):
        start = 0 if b == 0 else s // 3
        for blk in range(0, t, QB):
            keys = start + torch.randperm(s - start, generator=g)[:pool]
            for q in range(blk, min(blk + QB, t)):
                pick = keys[torch.randperm(keys.numel(), generator=g)[:topk]]
                idx[b, q, : pick.numel()] = pick.int()
        if b == 1:
            idx[b, -5:] = -1
    idx[torch.rand(idx.shape, generator=g) < empty] = -1
    return idx.to(DEVICE)


def _tensors(batch, t, s, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, t, hq, d, generator=g, dtype=dtype).to(DEVICE)
    k = torch.randn(batch, s, hkv, d, generator=g, dtype=dtype).to(DEVICE)
    v = torch.randn(batch, s, hkv, d, generator=g, dtype=dtype).to(DEVICE)
    return q, k, v


def _run(q, k, v, idx):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, lse = sparse_attention(q, k, v, idx, return_lse=True)
    grad = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype).to(DEVICE)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), grad)), grad


def _reference(q, k, v, idx, grad):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, lse = sparse_attention_reference(q, k, v, idx, q.shape[-1] ** -0.5)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), grad))


def _assert_close(got, want, dtype):
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            a, b = a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0)
        err = rel_err(a, b)
        assert err < (1e-5 if name == "lse" else TOL[dtype]), (name, err)


def test_plan_matches_reference_with_fallback_blocks():
    # 3 blocks per row, the last one partial; batch 1 block 1 repeats an index, block 2 of row 0 is over
    # the cap: both must fall back.
    idx = overlapping_indices(2, 150, 400, 20, 60, seed=0, empty=0.1)
    idx[0, 128:] = overlapping_indices(1, 22, 400, 20, 400, seed=9, empty=0.0)[0]
    idx[1, 70, 1] = idx[1, 70, 0] = 7
    plan = build_union_plan(idx, 400, cap=100)
    ref = union_plan_reference(idx, 400, cap=100)
    assert ref.use.tolist() == [True, True, False, True, False, True]
    fits = ref.count <= 100  # a union over the cap is counted only until the probe shows it is over
    assert torch.equal(plan.count.cpu()[fits], ref.count[fits]) and bool(
        (plan.count.cpu()[~fits] > 100).all()
    )
    assert torch.equal(plan.use.cpu(), ref.use)
    for i in range(ref.count.numel()):
        n = int(ref.count[i])
        if n <= 100:  # over the cap only the count matters
            assert torch.equal(plan.keys[i, :n].cpu(), ref.keys[i, :n])
            assert torch.equal(plan.members[i, :n].cpu(), ref.members[i, :n])


# (queries, keys, q_heads, kv_heads, head_dim, topk, pool): T not a multiple of 64, G in {8, 2, 1, 3},
# topk larger than the pool (trailing -1 slots), a head_dim that is not a power of two.
SHAPES = [
    (75, 90, 8, 1, 16, 24, 40),
    (70, 64, 4, 2, 64, 40, 30),
    (66, 50, 2, 2, 16, 12, 20),
    (67, 40, 6, 2, 24, 8, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_union_path_matches_reference_and_per_query(force_impl, monkeypatch, shape, dtype):
    t, s, hq, hkv, d, topk, pool = shape
    force_impl("triton")
    q, k, v = _tensors(2, t, s, hq, hkv, d, dtype, seed=t + d)
    idx = overlapping_indices(2, t, s, topk, pool, seed=t)
    idx[0, 0] = -1  # a query with no key at all
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "union")
    assert bool(plan_for(idx, s).use.all())  # every block really takes the union path
    got, grad = _run(q, k, v, idx)
    _assert_close(got, _reference(q, k, v, idx, grad), dtype)
    assert torch.all(got[0][0, 0] == 0) and torch.all(torch.isneginf(got[1][0, 0]))
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "per_query")
    _assert_close(got, _run(q, k, v, idx)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_union_and_per_query_blocks(force_impl, monkeypatch, dtype):
    """Repeated indices (counted twice, as by the reference) and over-cap blocks go per query."""
    force_impl("triton")
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "union")
    monkeypatch.setattr(union, "UNION_CAP", 64)
    q, k, v = _tensors(2, 140, 200, 8, 2, 16, dtype, seed=4)
    idx = overlapping_indices(2, 140, 200, 16, 50, seed=4)
    idx[0, 64:128] = torch.randint(0, 200, (64, 16), generator=torch.Generator().manual_seed(2))  # random
    idx[1, 3, :3] = 11  # one query repeats a key three times
    assert plan_for(idx, 200).use.tolist() == [True, False, True, False, True, True]
    got, grad = _run(q, k, v, idx)
    _assert_close(got, _reference(q, k, v, idx, grad), dtype)


def test_varlen_through_union(force_impl, monkeypatch):
    force_impl("triton")
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "union")
    lengths = [70, 9, 60]
    cu = torch.tensor([0, 70, 79, 139], dtype=torch.int32, device=DEVICE)
    q, k, v = (x[0] for x in _tensors(1, 139, 139, 4, 2, 16, torch.float32, seed=6))
    rel = torch.cat([overlapping_indices(1, n, n, 10, 25, seed=n)[0] for n in lengths])
    assert bool(plan_for(varlen_to_absolute(rel, cu)[None], 139).use.all())
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = sparse_attention_varlen(q, k, v, rel, cu)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    force_impl("reference")
    for x in (q, k, v):
        x.grad = None
    ref = sparse_attention_varlen(q, k, v, rel, cu)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for a, x in zip(grads, (q, k, v)):
        assert rel_err(a, x.grad) < 1e-5


def test_path_choice(monkeypatch):
    idx = torch.zeros(1, QB - 1, 4, dtype=torch.int32, device=DEVICE)
    assert plan_for(idx, 8) is None  # auto: fewer queries than one block
    assert plan_for(torch.zeros(1, QB, 4, dtype=torch.int32, device=DEVICE), 8) is not None
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "per_query")
    assert plan_for(torch.zeros(1, QB, 4, dtype=torch.int32, device=DEVICE), 8) is None
    monkeypatch.setenv("KEYE_DSA_SPARSE_PATH", "fast")
    with pytest.raises(ValueError, match="KEYE_DSA_SPARSE_PATH must be one of"):
        plan_for(idx, 8)


def test_slice_queries_fill_128_rows():
    assert slice_queries(8) == 16  # Qwen3: 16 queries x 8 heads
    assert slice_queries(1) == 64
    assert slice_queries(3) == 32  # 96 real rows of a 128-row tile
    assert slice_queries(256) == 1
    assert slice_queries(8, rows=64) == 8
