"""Packed batches, gradients through the whole model, backend switching and the decoder plugin hook."""

from __future__ import annotations

import pytest
import torch

from keye_moe import KeyeMoeForCausalLM

from .conftest import tiny_config


def test_packed_batch_equals_separate_sequences(tiny_model):
    seqs = [torch.randint(0, 512, (n,)) for n in (5, 1, 7)]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    out = tiny_model(packed, cu_seqlens=cu, labels=packed)
    start = 0
    losses, counts = [], []
    for s in seqs:
        alone = tiny_model(s[None], labels=s[None])
        torch.testing.assert_close(
            out.logits[0, start : start + len(s)], alone.logits[0], rtol=1e-5, atol=1e-5
        )
        if len(s) > 1:
            ce = torch.nn.functional.cross_entropy(alone.logits[0, :-1], s[1:], reduction="sum")
            losses.append(ce)
            counts.append(len(s) - 1)
        start += len(s)
    ce = torch.stack(losses).sum() / sum(counts)  # no prediction crosses a sequence boundary
    expected = ce + tiny_model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        tiny_model(packed, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_model_gradients_match_the_loop_backend(backend):
    torch.manual_seed(0)
    model = KeyeMoeForCausalLM(tiny_config())
    ids = torch.randint(0, 512, (2, 9))
    grads = {}
    for name in ("loop", backend):
        model.set_expert_implementation(name)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k, g in grads["loop"].items():
        torch.testing.assert_close(grads[backend][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = KeyeMoeForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 512, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], msg=k)


def test_unknown_expert_backend_is_named(tiny_model):
    with pytest.raises(Exception, match="no expert backend named 'fast'"):
        tiny_model.set_expert_implementation("fast")


def test_decoder_hook_builds_the_model():
    from keye_moe import builtin_plugin

    factory = builtin_plugin.keye_decoders()["keye-moe"]
    model = factory(tiny_config())
    assert isinstance(model, KeyeMoeForCausalLM)
    assert isinstance(factory(tiny_config().to_hf_config()), KeyeMoeForCausalLM)


def test_auto_expert_backend_choice_on_cpu():
    from keye_moe.layers.moe import resolve_expert_implementation

    cpu = torch.device("cpu")
    assert resolve_expert_implementation("auto", cpu, torch.float32, 10**6) == "grouped_mm"
    assert resolve_expert_implementation("triton", cpu, torch.float32) == "triton"


def test_expert_bias_counts_once_per_step_even_with_checkpointing():
    torch.manual_seed(0)
    model = KeyeMoeForCausalLM(tiny_config(expert_bias=True)).train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, 512, (2, 8))
    model(ids, labels=ids).loss.backward()
    gate = model.model.layers[0].mlp.gate
    assert float(gate.expert_load.sum()) == 2 * 8 * model.config.num_experts_per_tok
    before = gate.e_score_correction_bias.clone()
    model.update_expert_bias()
    assert not torch.equal(gate.e_score_correction_bias, before) and float(gate.expert_load.sum()) == 0
    model.eval()
    model(ids)
    assert float(gate.expert_load.sum()) == 0  # inference never counts
