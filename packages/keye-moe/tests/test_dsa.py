"""With keye-dsa installed, the ``dsa`` backend plugs in; with top-k >= length it equals dense attention."""

from __future__ import annotations

import pytest
import torch

from keye_moe import KeyeMoeForCausalLM, attention_backends

from .conftest import scaled_rope_hf_model, tiny_config

pytest.importorskip("keye_dsa")
if "dsa" not in attention_backends():
    pytest.skip("keye-dsa does not register its 'dsa' backend yet", allow_module_level=True)

SA = {"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 64}


def pair(**overrides):
    torch.manual_seed(0)
    dsa = KeyeMoeForCausalLM(tiny_config(sa_config=SA, **overrides)).eval()
    with torch.no_grad():
        for p in dsa.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    dense = KeyeMoeForCausalLM(tiny_config(sa_config=SA, attn_implementation="sdpa", **overrides)).eval()
    missing, unexpected = dense.load_state_dict(dsa.state_dict(), strict=False)
    assert not missing and all(".sa_indexer." in k for k in unexpected) and unexpected
    return dsa, dense


def test_dsa_is_chosen_and_mounts_sa_indexer():
    model = KeyeMoeForCausalLM(tiny_config(sa_config=SA))
    assert model.attn_implementation == "dsa"
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.self_attn.sa_indexer.q_proj.weight" in names


@pytest.mark.parametrize("mrope", [None, [2, 3, 3]])
def test_dsa_with_topk_above_length_equals_dense(mrope):
    dsa, dense = pair(mrope_section=mrope)
    ids = torch.randint(3, 512, (2, 12))
    torch.testing.assert_close(dsa(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    a = dsa.generate(ids, max_new_tokens=8, eos_token_id=[])
    b = dense.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(a, b)
    c = dsa.generate(ids, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert torch.equal(a, c)


def test_dsa_checkpoint_round_trip_and_fresh_indexers(tmp_path):
    dsa, dense = pair()
    dsa.save_pretrained(tmp_path / "dsa")
    again = KeyeMoeForCausalLM.from_pretrained(tmp_path / "dsa")
    ids = torch.randint(3, 512, (1, 9))
    torch.testing.assert_close(again(ids).logits, dsa(ids).logits)
    dense.save_pretrained(tmp_path / "dense")  # no sa_indexer tensors: indexers start fresh
    fresh = KeyeMoeForCausalLM.from_pretrained(tmp_path / "dense")
    assert fresh.attn_implementation == "dsa"
    torch.testing.assert_close(fresh(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_yarn_model_equals_transformers_patched_with_dsa(tmp_path):
    """Under YaRN the indexer rotates by the decoder's scaled cos/sin, as keye-dsa's Hugging Face drop-in
    does: a patched transformers Qwen3-MoE and keye-moe's dsa backend give the same logits with a top-k
    small enough that the selection matters."""
    import json

    from keye_dsa import patch_model

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    hf = scaled_rope_hf_model(yarn, 0.2, lambda m: patch_model(m, topk=5, num_heads=2, head_dim=16))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sa_config"] = {"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = KeyeMoeForCausalLM.from_pretrained(tmp_path)
    assert model.attn_implementation == "dsa" and model.config.rope_scaling == yarn
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :12]
    cached = model.generate(prompt, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, eos_token_id=[], use_cache=False))
    with pytest.raises(ValueError, match="indexer_head_dim"):
        KeyeMoeForCausalLM(model.config.replace(sa_config={**config["sa_config"], "indexer_head_dim": 8}))
