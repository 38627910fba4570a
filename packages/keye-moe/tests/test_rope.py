from __future__ import annotations

import pytest
import torch

from keye_moe.layers.rope import RotaryEmbedding


def test_mrope_with_three_equal_rows_is_1d_rope():
    pos = torch.randint(0, 1000, (2, 9))
    plain = RotaryEmbedding(64, 10000.0)
    for interleaved in (False, True):
        m = RotaryEmbedding(64, 10000.0, [8, 12, 12], interleaved)
        for a, b in zip(m(pos[None].expand(3, -1, -1), torch.float32), plain(pos, torch.float32)):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("module", "section", "interleaved"),
    [("qwen2_vl", [16, 24, 24], False), ("qwen3_vl", [24, 20, 20], True)],
)
def test_mrope_matches_transformers_layouts(module, section, interleaved):
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    if module == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as Ref

        cfg = transformers.models.qwen2_vl.configuration_qwen2_vl.Qwen2VLTextConfig(
            hidden_size=256, num_attention_heads=2, rope_parameters=rope
        )
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Ref

        cfg = transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VLTextConfig(
            hidden_size=256,
            num_attention_heads=2,
            head_dim=128,
            rope_parameters={**rope, "mrope_interleaved": True},
        )
    pos = torch.randint(0, 500, (3, 2, 11))
    ref_cos, ref_sin = Ref(cfg)(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(128, 10000.0, section, interleaved)(pos, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_3d_positions_need_mrope_section():
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding(16, 10000.0)(torch.zeros(3, 1, 4, dtype=torch.long), torch.float32)


SCALINGS = [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 300, "beta_fast": 16,
     "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 0.8},
]  # fmt: skip


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_scaled_rope_matches_transformers_bit_for_bit(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=256, num_attention_heads=2, head_dim=64, max_position_embeddings=1024,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )  # fmt: skip
    pos = torch.randint(0, 2000, (2, 13))
    ref_cos, ref_sin = Qwen3MoeRotaryEmbedding(cfg)(torch.zeros(1), pos)
    rope = RotaryEmbedding(64, 10000.0, scaling=scaling)
    cos, sin = rope(pos, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    plain_cos, _ = RotaryEmbedding(64, 10000.0)(pos, torch.float32)
    assert not torch.allclose(cos, plain_cos)  # the scaling changed the angles


def test_yarn_mrope_matches_transformers_qwen3_vl():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Ref

    scaling = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 512}
    cfg = transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VLTextConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128,
        rope_parameters={**scaling, "rope_theta": 5e5, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )  # fmt: skip
    pos = torch.randint(0, 3000, (3, 2, 11))
    ref_cos, ref_sin = Ref(cfg)(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(128, 5e5, [24, 20, 20], True, scaling)(pos, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
