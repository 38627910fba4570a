from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keye_moe.layers.router import Router, switch_aux_loss
from keye_moe.layers.topk_softmax import reference_topk_softmax


def test_router_matches_transformers_qwen3_moe_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for norm in (True, False):
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=32, num_experts=10, num_experts_per_tok=3, norm_topk_prob=norm
        )
        ref = Qwen3MoeTopKRouter(cfg)
        torch.nn.init.normal_(ref.weight)
        mine = Router(32, 10, 3, norm, expert_bias=False)
        mine.weight.data.copy_(ref.weight.data)
        x = torch.randn(20, 32)
        _, ref_w, ref_ids = ref(x)
        ids, w, _ = mine(x)
        assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w, rtol=1e-6, atol=0)


def test_switch_loss_matches_transformers_over_layers_and_padding():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    routers = [Router(16, 6, 2, True, False) for _ in range(3)]
    for r in routers:
        torch.nn.init.normal_(r.weight)
    x = [torch.randn(2 * 5, 16) for _ in routers]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    for m in (None, mask):
        stats = [r(xi, m)[2] for r, xi in zip(routers, x)]
        logits = tuple(torch.nn.functional.linear(xi, r.weight) for r, xi in zip(routers, x))
        ref = load_balancing_loss_func(logits, 6, 2, m)
        assert torch.allclose(switch_aux_loss(stats, 6), ref, rtol=1e-6)


def test_expert_bias_changes_selection_not_weights_and_balances():
    router = Router(8, 4, 1, norm_topk_prob=False, expert_bias=True)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, 8)
    probs = torch.softmax(x @ router.weight.T, -1)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    ids, w, _ = router(x)
    assert (ids == 3).all()
    assert torch.allclose(w[:, 0], probs[:, 3])  # weight is the unbiased probability
    router.e_score_correction_bias.zero_()
    router.train()
    loads = []
    for _ in range(200):
        router.record_load(router(x)[2])
        loads.append(router.expert_load.clone())
        router.update_bias(0.01)
    first, last = loads[0], loads[-1]
    assert last.max() - last.min() < first.max() - first.min()
    assert router.e_score_correction_bias.dtype == torch.float32
    router.to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.float32


def test_update_bias_needs_the_option():
    with pytest.raises(RuntimeError, match="expert_bias"):
        Router(8, 4, 1, False, expert_bias=False).update_bias(0.1)


def test_fused_router_statistics_over_many_row_blocks():
    """2085 rows = 131 blocks of 16: more partial rows than one pass of the block-summing kernel (64)."""
    from keye_moe.layers.topk_softmax import reference_topk_softmax, route

    g = torch.Generator().manual_seed(5)
    n, e, k, h = 2085, 10, 3, 16
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(e, h, generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).float()
    ids, _, counts, prob_sum, logits = route(hidden, weight, k, True, None, mask)
    ref_ids, _, probs = reference_topk_softmax(logits, k, True)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, torch.zeros(e).index_add_(0, ref_ids.reshape(-1), mask.repeat_interleave(k)))
    assert torch.allclose(prob_sum, (probs * mask[:, None]).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "norm", "with_bias", "with_mask", "h"),
    [
        (torch.float32, True, False, False, 48),
        (torch.float32, False, True, False, 40),
        (torch.float32, True, True, True, 40),
        (torch.float32, False, False, True, 48),
        (torch.bfloat16, True, False, True, 32),
    ],
)
def test_fused_router_equals_the_gemm_and_the_reference(dtype, norm, with_bias, with_mask, h):
    """The one-kernel router (logits GEMM + top-k softmax + statistics; the Triton interpreter here)
    against ``F.linear`` and the PyTorch math on the kernel's own logits: ids, weights and statistics
    exactly, and every gradient (hidden, router weight; through the weights, the summed probabilities
    and the returned logits) against autograd through the reference. 37 rows (three blocks, the last
    ragged), 10 experts (a padded tile), hidden 40 (not a multiple of the k step)."""
    from keye_moe.layers.topk_softmax import reference_topk_softmax, route

    g = torch.Generator().manual_seed(h)
    n, e, k = 37, 10, 3
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(e, h, generator=g) * h**-0.5).to(dtype).requires_grad_()
    bias = torch.randn(e, generator=g) * 0.1 if with_bias else None
    mask = (torch.rand(n, generator=g) > 0.3).float() if with_mask else None
    d_w = torch.randn(n, k, generator=g).to(dtype)
    d_p, d_l = torch.randn(e, generator=g), torch.randn(n, e, generator=g).to(dtype)

    ids, w, counts, prob_sum, logits = route(hidden, weight, k, norm, bias, mask)
    want_logits = F.linear(hidden, weight)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logits, want_logits, **tol)
    ref_ids, _, probs = reference_topk_softmax(logits.detach(), k, norm, bias)
    m = torch.ones(n) if mask is None else mask
    # 16-bit logits tie often: any order among equal selection scores is a valid top-k
    score = probs if bias is None else probs + bias
    assert torch.equal(score.gather(-1, ids), score.gather(-1, ref_ids))
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)
    ref_w = probs.gather(-1, ids)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True) if norm else ref_w
    w_tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else tol  # bf16: one rounding step
    torch.testing.assert_close(w, ref_w.to(dtype), **w_tol)
    assert torch.equal(counts, torch.zeros(e).index_add_(0, ids.reshape(-1), m.repeat_interleave(k)))
    torch.testing.assert_close(prob_sum, (probs * m[:, None]).sum(0), rtol=1e-5, atol=1e-5)

    got = torch.autograd.grad((w, prob_sum, logits), (hidden, weight), (d_w, d_p, d_l))
    # the reference chain on the kernel's logits: the same ids (a softmax of the same logits)
    ref_logits = want_logits + (logits - want_logits).detach()
    ref_probs = torch.softmax(ref_logits, -1, dtype=torch.float)
    ref_weights = ref_probs.gather(-1, ids)
    ref_weights = (ref_weights / ref_weights.sum(-1, keepdim=True) if norm else ref_weights).to(dtype)
    ref_sum = (ref_probs * m[:, None]).sum(0)
    want = torch.autograd.grad((ref_weights, ref_sum, ref_logits), (hidden, weight), (d_w, d_p, d_l))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_router_names_bad_inputs():
    from keye_moe.layers.topk_softmax import route

    with pytest.raises(ValueError, match="router weight"):
        route(torch.randn(4, 8), torch.randn(6, 7), 2, True)
    with pytest.raises(ValueError, match="top_k=7"):
        route(torch.randn(4, 8), torch.randn(6, 8), 7, True)
    with pytest.raises(ValueError, match="share a dtype"):
        route(torch.randn(4, 8), torch.randn(6, 8, dtype=torch.float64), 2, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_router_on_cuda_routes_its_own_logits(autocast):
    """The CUDA router (the fused kernel) in bf16, or under bf16 autocast with fp32 weights as in
    ``bf16-mixed`` training: its choices are the reference's on the logits F.linear gives."""
    torch.manual_seed(0)
    n, h, e, k = 300, 256, 64, 8
    router = Router(h, e, k, True, expert_bias=False).cuda()
    torch.nn.init.normal_(router.weight, std=h**-0.5)
    hidden = torch.randn(n, h, device="cuda")
    if not autocast:
        router, hidden = router.bfloat16(), hidden.bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ids, weights, stats = router(hidden)
        logits = F.linear(hidden, router.weight)
    assert weights.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    ref_ids, ref_w, _ = reference_topk_softmax(logits, k, True)
    probs = torch.softmax(logits, -1, dtype=torch.float)
    # the kernel's GEMM may round a logit differently from cuBLAS's: near-ties may swap
    assert (probs.gather(-1, ids) - probs.gather(-1, ref_ids)).abs().max() < 1e-2
    assert (weights.float().sort(-1).values - ref_w.float().sort(-1).values).abs().max() < 2e-2
    assert stats.tokens_per_expert.sum() == n * k
