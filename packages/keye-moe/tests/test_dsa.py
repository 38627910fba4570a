"""With keye-dsa installed, the ``dsa`` backend plugs in; with top-k >= length it equals dense attention."""

from __future__ import annotations

import pytest
import torch

from keye_moe import KeyeMoeForCausalLM, attention_backends

from .conftest import tiny_config

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
