import pytest
import torch

from keye_dsa import indexer_kl_loss, select_topk
from keye_dsa.ops.indexer_kl import chunked
from keye_dsa.ops.indexer_kl.reference import indexer_kl_reference
from keye_dsa.testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b=2, t=13, hq=8, hkv=2, d=16, h=3, di=8, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, qi, ki, w = (
        torch.randn(*shape, generator=g, dtype=dtype).to(device)
        for shape in ((b, t, hq, d), (b, t, hkv, d), (b, t, h, di), (b, t, di), (b, t, h))
    )
    return q, k, qi.requires_grad_(), ki.requires_grad_(), w.requires_grad_()


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_naive_reference(monkeypatch, stage, dtype):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 3000)  # a handful of queries per chunk
    q, k, qi, ki, w = _inputs(dtype=dtype, seed=1)
    start = torch.tensor([0, 4])
    sel = select_topk(qi.detach(), ki.detach(), w.detach(), 5, key_start=start)
    idx = None if stage == "dense_warmup" else sel
    got = indexer_kl_loss(q, k, qi, ki, w, indices=idx, key_start=start, reduction="none")
    want = indexer_kl_reference(q, k, qi, ki, w, indices=idx, scale=16**-0.5, key_start=start)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(got, want) < tol
    assert (got >= -tol).all() and got[1, :4].abs().max() == 0  # padding queries see no key
    g = torch.randn_like(got)
    got_g = torch.autograd.grad(got, (qi, ki, w), g)
    want_g = torch.autograd.grad(want, (qi, ki, w), g)
    for a, b in zip(got_g, want_g):
        assert rel_err(a, b) < 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [5, 16])  # 16 > t: every key, then -1 slots
def test_sparse_kernel_matches_reference(force_impl, dtype, topk):
    force_impl("triton")
    q, k, qi, ki, w = _inputs(b=2, t=11, dtype=dtype, seed=8, device=DEVICE)
    idx = select_topk(qi.detach().float(), ki.detach().float(), w.detach().float(), topk)
    idx[0, 3] = -1  # a query with no key: zero loss, zero gradient
    got = indexer_kl_loss(q, k, qi, ki, w, indices=idx, reduction="none")
    want = indexer_kl_reference(q, k, qi, ki, w, indices=idx, scale=16**-0.5)
    assert rel_err(got, want) < 1e-5 and got[0, 3] == 0
    _assert_grads_match(got, want, (qi, ki, w), 1e-5 if dtype == torch.float32 else 1.5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("hq", "hkv", "h", "keys"),
    [(8, 2, 3, 13), (6, 2, 4, 21), (4, 4, 1, 13)],  # groups of 4, 3 (padded to 4) and 1; a longer cache
)
def test_dense_kernel_matches_reference(force_impl, dtype, hq, hkv, h, keys):
    """The flash-style warm-up kernel: odd head counts, queries that are the last ``t`` of ``keys``
    (``S > T``), left padding that hides every key of the first queries of row 1."""
    force_impl("triton")
    g = torch.Generator().manual_seed(hq + keys)
    t, d, di = 13, 16, 8
    q = torch.randn(2, t, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(2, keys, hkv, d, generator=g).to(DEVICE, dtype)
    qi, ki, w = (
        torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
        for shape in ((2, t, h, di), (2, keys, di), (2, t, h))
    )
    start = torch.tensor([0, keys - t + 4], device=DEVICE)  # row 1: queries 0-3 see no key
    got = indexer_kl_loss(q, k, qi, ki, w, key_start=start, reduction="none")
    want = indexer_kl_reference(q, k, qi, ki, w, scale=d**-0.5, key_start=start)
    assert rel_err(got, want) < 1e-5 and got[1, :4].abs().max() == 0
    _assert_grads_match(got, want, (qi, ki, w), 1e-5 if dtype == torch.float32 else 1.5e-2)


def _assert_grads_match(got, want, inputs, tol):
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(sparse):
    q, k, qi, ki, w = _inputs(b=1, t=5, hq=4, seed=3)
    idx = select_topk(qi.detach(), ki.detach(), w.detach(), 3) if sparse else None
    assert torch.autograd.gradcheck(lambda a, b, c: indexer_kl_loss(q, k, a, b, c, indices=idx), (qi, ki, w))


def test_no_gradient_reaches_the_decoder():
    q, k, qi, ki, w = _inputs(seed=4)
    q.requires_grad_(True)
    k.requires_grad_(True)
    indexer_kl_loss(q, k, qi, ki, w).backward()
    assert q.grad is None and k.grad is None and qi.grad is not None


def test_kl_is_zero_when_indexer_matches_target():
    """One key visible per query (t = 0), or a single selected key: both distributions are one-hot."""
    q, k, qi, ki, w = _inputs(b=1, t=6, seed=5)
    idx = torch.full((1, 6, 3), -1, dtype=torch.int32)
    idx[0, :, 0] = 0
    assert indexer_kl_loss(q, k, qi, ki, w, indices=idx).abs() < 1e-12
    assert indexer_kl_loss(q, k, qi, ki, w, reduction="none")[0, 0].abs() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_packed_matches_per_sequence(force_impl, stage, dtype):
    """One launch over a packed row (an empty sequence, tiles that straddle sequences) equals the
    reference sequence by sequence, loss and gradients."""
    force_impl("triton")
    q, k, qi, ki, w = _inputs(b=1, t=30, dtype=dtype, seed=6, device=DEVICE)
    cu = torch.tensor([0, 5, 5, 12, 30], dtype=torch.int32, device=DEVICE)
    bounds = ((0, 5), (5, 5), (5, 12), (12, 30))
    rel = None
    if stage == "sparse":
        rel = select_topk(qi[0].detach(), ki[0].detach(), w[0].detach(), 3, cu_seqlens=cu)
    got = indexer_kl_loss(q[0], k[0], qi[0], ki[0], w[0], indices=rel, cu_seqlens=cu, reduction="none")
    want = []
    for a, b in bounds:
        idx = None if rel is None else rel[None, a:b]
        part = indexer_kl_reference(
            q[:, a:b], k[:, a:b], qi[:, a:b], ki[:, a:b], w[:, a:b], indices=idx, scale=0.25
        )
        want.append(part[0])
    want = torch.cat(want)
    assert got.shape == (30,) and rel_err(got, want) < 1e-5
    _assert_grads_match(got, want, (qi, ki, w), 1e-5 if dtype == torch.float32 else 1.5e-2)


def test_clear_errors():
    q, k, qi, ki, w = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        indexer_kl_loss(q, k, qi, ki, w, reduction="avg")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        indexer_kl_loss(q[:, :, :3], k, qi, ki, w)
    with pytest.raises(ValueError, match="k_index.shape"):
        indexer_kl_loss(q, k, qi, ki[:, :4], w)
    with pytest.raises(ValueError, match="not both"):
        cu = torch.tensor([0, 13], dtype=torch.int32)
        indexer_kl_loss(q[0], k[0], qi[0], ki[0], w[0], cu_seqlens=cu, key_start=torch.tensor([0]))
    with pytest.raises(ValueError, match="indices must have rank 3"):
        indexer_kl_loss(q, k, qi, ki, w, indices=torch.zeros(2, 13, dtype=torch.int32))
