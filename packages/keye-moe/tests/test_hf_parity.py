"""A tiny random transformers Qwen3MoeForCausalLM, saved with save_pretrained, loads into keye-moe and
gives the same logits, loss and router aux loss."""

from __future__ import annotations

import pytest
import torch

from keye_moe import KeyeMoeForCausalLM

from .conftest import scaled_rope_hf_model

transformers = pytest.importorskip("transformers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("hf_qwen3moe")
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("expert_implementation", ["loop", "grouped_mm", "triton"])
def test_logits_loss_and_aux_loss_match_transformers(hf_checkpoint, expert_implementation):
    hf, path = hf_checkpoint
    model = KeyeMoeForCausalLM.from_pretrained(path)
    model.set_expert_implementation(expert_implementation)
    assert model.config.num_experts == 8 and model.config.norm_topk_prob
    assert not model.config.is_moe_layer(1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    ref = hf(input_ids=ids, labels=labels)
    out = model(ids, labels=labels)
    assert rel(out.logits, ref.logits) < 1e-5
    assert rel(out.aux_loss, ref.aux_loss) < 1e-5
    assert rel(out.loss, ref.loss) < 1e-5


def test_left_padded_batch_matches_transformers_with_attention_mask(hf_checkpoint):
    hf, path = hf_checkpoint
    model = KeyeMoeForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    out = model(ids, attention_mask=mask)
    real = mask.bool()
    assert rel(out.logits[real], ref.logits[real]) < 1e-5
    assert rel(out.aux_loss, ref.aux_loss) < 1e-5


def test_saved_keye_checkpoint_loads_back_into_transformers(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    model = KeyeMoeForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (1, 7))
    assert rel(again(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-6


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
         "original_max_position_embeddings": 8},
    ],
    ids=lambda s: s["rope_type"],
)  # fmt: skip
def test_scaled_rope_checkpoint_matches_transformers(scaling, tmp_path):
    hf = scaled_rope_hf_model(scaling, 0.15)
    hf.save_pretrained(tmp_path)
    model = KeyeMoeForCausalLM.from_pretrained(tmp_path)
    assert model.config.rope_scaling == scaling
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    assert rel(model(ids).logits, hf(input_ids=ids).logits) < 1e-5
    model.save_pretrained(tmp_path / "again")
    again = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager")
    assert again.config.rope_parameters["rope_type"] == scaling["rope_type"]
    assert rel(again.eval()(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-6
