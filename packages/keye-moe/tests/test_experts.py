"""Every expert backend available on the CPU equals the loop reference, forward and backward, on fresh
random inputs, including experts that receive no tokens."""

from __future__ import annotations

import pytest
import torch

from keye_moe import expert_backends, make_expert_backend
from keye_moe.experts.loop import loop_experts

FAST = ["grouped_mm", "triton"]


def random_case(n, k, e, h, i, *, seed, dtype=torch.float32, unused=()):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([x for x in range(e) if x not in unused])
    rows = [allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(n)]
    ids = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = torch.rand(n, k, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(dtype).requires_grad_()
    grad = torch.randn(n, h, generator=g).to(dtype)
    return (x, ids, w, gate_up, down), grad


def run(fn, args, grad):
    x, ids, w, gate_up, down = args
    for t in (x, w, gate_up, down):
        t.grad = None
    out = fn(x, ids, w, gate_up, down)
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in (x, w, gate_up, down)]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def test_registry_lists_the_builtin_backends():
    assert {"loop", "grouped_mm", "triton"} <= set(expert_backends())
    with pytest.raises(Exception, match="available: .*loop"):
        make_expert_backend("nope")


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize(
    ("n", "k", "e", "h", "i", "unused"),
    [(13, 2, 5, 48, 24, (4,)), (40, 4, 8, 32, 40, (0, 3)), (3, 1, 6, 16, 16, (1, 2, 3))],
)
def test_backend_equals_loop_forward_and_backward_fp32(name, n, k, e, h, i, unused):
    args, grad = random_case(n, k, e, h, i, seed=n * 7 + e, unused=unused)
    ref = run(loop_experts, args, grad)
    got = run(make_expert_backend(name), args, grad)
    for what, a, b in zip(("out", "d_hidden", "d_weights", "d_gate_up", "d_down"), got, ref):
        assert rel(a, b) < 1e-5, (name, what, rel(a, b))
    for unused_expert in unused:  # experts without tokens get exactly zero gradient
        assert (
            torch.count_nonzero(got[3][unused_expert]) == 0
            and torch.count_nonzero(got[4][unused_expert]) == 0
        )


def test_grouped_mm_bf16_within_1e2_of_fp32_loop():
    args, grad = random_case(64, 4, 8, 64, 32, seed=3)
    ref = run(loop_experts, args, grad)
    low = [t.detach().bfloat16().requires_grad_() if t.is_floating_point() else t for t in args]
    got = run(make_expert_backend("grouped_mm"), low, grad.bfloat16())
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-2


def test_no_tokens_at_all():
    args, _ = random_case(0, 2, 4, 16, 16, seed=0)
    for name in ["loop", *FAST]:
        out = make_expert_backend(name)(*args)
        assert out.shape == (0, 16)


@pytest.mark.parametrize("name", ["loop", *FAST])
def test_bad_shapes_are_named(name):
    (x, ids, w, gate_up, down), _ = random_case(4, 2, 4, 16, 16, seed=0)
    fn = make_expert_backend(name)
    with pytest.raises(ValueError, match="down_proj"):
        fn(x, ids, w, gate_up, down[:, :, :8])
    with pytest.raises(ValueError, match="topk_weights"):
        fn(x, ids, w[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="hidden"):
        fn(x[None], ids, w, gate_up, down)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAST)
def test_cuda_bf16_backends_match_loop(name):
    args, grad = random_case(512, 8, 16, 256, 128, seed=5)
    args = [t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda() for t in args]
    ref = run(loop_experts, args, grad.cuda())
    low = [t.detach().bfloat16().requires_grad_() if t.is_floating_point() else t for t in args]
    got = run(make_expert_backend(name), low, grad.cuda().bfloat16())
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-2


def test_triton_on_cpu_without_the_interpreter_says_so(monkeypatch):
    from keye_moe.experts.triton import kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    args, _ = random_case(4, 2, 4, 16, 16, seed=0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        make_expert_backend("triton")(*args)


@pytest.mark.parametrize("name", FAST)
def test_frozen_experts_still_give_input_gradients(name):
    (x, ids, w, gate_up, down), grad = random_case(21, 2, 6, 32, 16, seed=9, unused=(1,))
    gate_up, down = gate_up.detach(), down.detach()
    ref = torch.autograd.grad(loop_experts(x, ids, w, gate_up, down), (x, w), grad)
    got = torch.autograd.grad(make_expert_backend(name)(x, ids, w, gate_up, down), (x, w), grad)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize(("n", "k", "e", "block_m"), [(77, 3, 9, 16), (300, 8, 128, 64), (5, 2, 4, 16)])
def test_triton_plan_equals_the_argsort_reference(n, k, e, block_m):
    """The two plan kernels (histograms per chunk, stable placement; 300 x 8 slots span 3 chunks) give
    exactly the padded dispatch that a stable argsort and searchsorted give."""
    from keye_moe.experts.triton.plan import make_plan, reference_plan

    (_, ids, *_), _ = random_case(n, k, e, 8, 8, seed=n + e, unused=(1,))
    got, ref = make_plan(ids, e, block_m), reference_plan(ids, e, block_m)
    for field in ("row_slot", "block_expert", "expert_start", "counts"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert got.num_blocks == ref.num_blocks and int(got.counts[1]) == 0


def test_triton_pointer_path_equals_loop(monkeypatch):
    """Without TMA (pre-Hopper GPUs, unaligned rows) the kernels load weights through pointers."""
    from keye_moe.experts.triton import kernels

    monkeypatch.setattr(kernels, "tma_ok", lambda *tensors: False)
    args, grad = random_case(29, 3, 6, 40, 24, seed=11, unused=(2,))
    ref = run(loop_experts, args, grad)
    got = run(make_expert_backend("triton"), args, grad)
    for what, a, b in zip(("out", "d_hidden", "d_weights", "d_gate_up", "d_down"), got, ref):
        assert rel(a, b) < 1e-5, (what, rel(a, b))
