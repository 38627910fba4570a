import pytest
import torch
import torch.nn.functional as F

from keye_dsa import sparse_attention, sparse_attention_varlen
from keye_dsa.ops.sparse_attention import triton_kernel
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference
from keye_dsa.ops.sparse_attention.triton_kernel import pack_size
from keye_dsa.testing import TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, queries, keys, q_heads, kv_heads, head_dim, topk): odd lengths, topk > keys, G from 1 to 16,
# a head_dim that is not a power of two.
SHAPES = [
    (2, 7, 11, 8, 2, 16, 5),
    (1, 5, 9, 4, 4, 24, 13),
    (1, 3, 6, 32, 2, 16, 4),
    (2, 9, 9, 16, 1, 32, 70),
    (1, 4, 10, 6, 2, 16, 3),
    (1, 3, 100, 8, 2, 16, 75),  # 3 slot splits of 32 when decoding-like
]


def _inputs(shape, dtype, seed):
    b, t, s, hq, hkv, d, k = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g, dtype=dtype).to(DEVICE)
    kk = torch.randn(b, s, hkv, d, generator=g, dtype=dtype).to(DEVICE)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=dtype).to(DEVICE)
    idx = torch.randint(-1, s, (b, t, k), generator=g, dtype=torch.int32).to(DEVICE)
    idx[0, 0] = -1  # a query with no key at all
    return q, kk, v, idx


@pytest.mark.parametrize("min_programs", [1, 10**6], ids=["one-program-per-token", "split-slots"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_forward_backward(force_impl, monkeypatch, shape, dtype, min_programs):
    """``min_programs`` 10**6: each token's slots are split over as many programs as there are BLOCK_N
    steps (the decoding layout), then merged by their log-sum-exps."""
    monkeypatch.setattr(triton_kernel, "MIN_PROGRAMS", min_programs)
    q, k, v, idx = _inputs(shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    for x in (q, k, v):
        x.requires_grad_(True)
    force_impl("triton")
    o, lse = sparse_attention(q, k, v, idx, return_lse=True)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    o_ref, lse_ref = sparse_attention_reference(q, k, v, idx, q.shape[-1] ** -0.5)
    want = torch.autograd.grad(o_ref, (q, k, v), grad)
    assert rel_err(o, o_ref) < TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert rel_err(lse.nan_to_num(0, 0, 0), lse_ref.nan_to_num(0, 0, 0)) < 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2 * TOL[dtype]
    assert torch.all(o[0, 0] == 0) and torch.all(torch.isneginf(lse[0, 0]))


def test_pack_size_fills_sixteen_rows():
    assert pack_size(8, 4, 128) == 2  # Qwen3: two KV groups per program, 16 real heads
    assert pack_size(4, 8, 64) == 4
    assert pack_size(16, 4, 128) == 1
    assert pack_size(8, 3, 128) == 1  # no pack that divides the KV heads


def test_full_selection_equals_dense_causal(force_impl):
    force_impl("triton")
    q, k, v, _ = _inputs((2, 13, 13, 8, 2, 16, 1), torch.float32, seed=3)
    t = q.shape[1]
    pos = torch.arange(t, device=DEVICE)
    idx = torch.where(pos[None, :] <= pos[:, None], pos[None, :], -1).to(torch.int32)
    idx = idx[None].expand(2, t, t).contiguous()
    out = sparse_attention(q, k, v, idx)
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(out, dense) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_varlen_matches_per_sequence(force_impl, impl):
    force_impl(impl)
    lengths = [5, 1, 8]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(14, 8, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(14, 2, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(14, 2, 16, generator=g).to(DEVICE).requires_grad_()
    rel = torch.cat([torch.randint(-1, n, (n, 6), generator=g) for n in lengths]).to(torch.int32).to(DEVICE)
    out = sparse_attention_varlen(q, k, v, rel, cu)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts.append(sparse_attention(q[None, a:b], k[None, a:b], v[None, a:b], rel[None, a:b])[0])
    ref = torch.cat(parts)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for a, x in zip(grads, (q, k, v)):
        assert rel_err(a, x.grad) < 1e-5


def test_gradcheck_reference_float64(force_impl):
    force_impl("reference")
    q, k, v, idx = _inputs((1, 4, 6, 4, 2, 8, 3), torch.float64, seed=11)
    idx[0, 0] = torch.tensor([0, -1, -1])
    for x in (q, k, v):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: sparse_attention(a, b, c, idx), (q, k, v))


def test_clear_errors():
    q, k, v, idx = _inputs((1, 4, 6, 4, 2, 8, 3), torch.float32, seed=1)
    with pytest.raises(ValueError, match="q must have rank 4"):
        sparse_attention(q[0], k, v, idx)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sparse_attention(q[:, :, :3], k, v, idx)
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_attention(q, k.double(), v, idx)
    with pytest.raises(TypeError, match="indices must be int32"):
        sparse_attention(q, k, v, idx.float())
    with pytest.raises(IndexError, match=r"indices must lie in \[-1, 5\]"):
        sparse_attention(q, k, v, idx + 6)
    with pytest.raises(ValueError, match="indices.shape"):
        sparse_attention(q, k, v, idx[:, :2])
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(IndexError, match="past the end of its own sequence"):
        sparse_attention_varlen(q[0], k[0, :4], v[0, :4], torch.full((4, 2), 3, dtype=torch.int32), cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        sparse_attention_varlen(q[0], k[0, :4], v[0, :4], idx[0], cu + 1)
