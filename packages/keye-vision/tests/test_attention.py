"""Every packed-attention backend equals the plain reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from keye_vision.attention import available_backends, reference_attention, select_backend, varlen_attention


def _inputs(lengths, heads=3, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, heads, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def _check(backend, lengths, dtype, device, tol):
    q, k, v, cu, mx = _inputs(lengths, dtype=dtype, device=device)
    out = varlen_attention(q, k, v, cu, mx, backend)
    ref = reference_attention(q.float(), k.float(), v.float(), cu, mx)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("lengths", [[5], [7, 7, 7], [3, 11, 1, 11, 6], [16, 4, 16, 4]])
def test_sdpa_matches_reference_fp32(lengths):
    _check("sdpa", lengths, torch.float32, "cpu", 1e-5)


def test_attention_never_crosses_items():
    q, k, v, cu, mx = _inputs([4, 6])
    out = varlen_attention(q, k, v, cu, mx, "sdpa")
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[4:] += 5.0
    v2[4:] -= 3.0  # change only the second item's keys and values
    out2 = varlen_attention(q, k2, v2, cu, mx, "sdpa")
    torch.testing.assert_close(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])


def test_auto_picks_sdpa_on_cpu_and_rejects_unknown():
    q = torch.zeros(2, 1, 8)
    assert select_backend(q) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        select_backend(q, "nope")


def test_bad_shapes_and_cu_seqlens_are_named():
    q, k, v, cu, mx = _inputs([3, 3])
    with pytest.raises(ValueError, match="q, k, v must all be"):
        varlen_attention(q[:, 0], k, v, cu, mx)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        varlen_attention(q, k, v, cu.long(), mx)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_match_reference(dtype):
    for backend in available_backends("cuda"):
        if backend == "reference":
            continue
        tol = 2e-2 if backend != "sdpa" or dtype != torch.float32 else 1e-5
        _check(backend, [64, 729, 17, 256], dtype, "cuda", tol)
