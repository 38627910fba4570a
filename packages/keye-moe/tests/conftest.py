"""Shared fixtures: tiny configs and models, fp32, seeded."""

from __future__ import annotations

import pytest
import torch

from keye_moe import DecoderConfig, KeyeMoeForCausalLM


def tiny_config(**overrides) -> DecoderConfig:
    base = dict(expert_implementation="loop")
    return DecoderConfig.preset("tiny", **{**base, **overrides})


def scaled_rope_hf_model(scaling: dict, std: float, patch=None):
    """A tiny random transformers Qwen3MoeForCausalLM whose RoPE is scaled by ``scaling`` (``patch``
    applied before the weights are drawn with ``std``, so added modules get drawn too)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        max_position_embeddings=32, rope_parameters={**scaling, "rope_theta": 10000.0},
        attn_implementation="eager",
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model = patch(model) if patch is not None else model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


@pytest.fixture
def tiny_model() -> KeyeMoeForCausalLM:
    torch.manual_seed(0)
    model = KeyeMoeForCausalLM(tiny_config())
    # larger init than 0.02 so that routing and attention are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()
