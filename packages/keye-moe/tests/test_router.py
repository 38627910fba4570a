from __future__ import annotations

import pytest
import torch

from keye_moe.layers.router import Router, switch_aux_loss


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
