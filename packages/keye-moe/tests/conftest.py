"""Shared fixtures: tiny configs and models, fp32, seeded."""

from __future__ import annotations

import pytest
import torch

from keye_moe import DecoderConfig, KeyeMoeForCausalLM


def tiny_config(**overrides) -> DecoderConfig:
    base = dict(expert_implementation="loop")
    return DecoderConfig.preset("tiny", **{**base, **overrides})


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
