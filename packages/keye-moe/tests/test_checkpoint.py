from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from keye_moe import CheckpointError, KeyeMoeForCausalLM
from keye_moe.checkpoint import INDEX_NAME, checkpoint_files

from .conftest import tiny_config


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("expert_format", ["per_expert", "fused"])
def test_round_trip_sharded(tiny_model, tmp_path, expert_format):
    tiny_model.save_pretrained(tmp_path, max_shard_size="30KB", expert_format=expert_format)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    names = set(index["weight_map"])
    if expert_format == "per_expert":
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in names
        assert not any(n.endswith("experts.gate_up_proj") for n in names)
    else:
        assert "model.layers.1.mlp.experts.gate_up_proj" in names
    loaded = KeyeMoeForCausalLM.from_pretrained(tmp_path)
    assert same_state(loaded, tiny_model)
    ids = torch.randint(0, 512, (2, 6))
    assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)


def test_dtype_and_tied_embeddings(tmp_path):
    model = KeyeMoeForCausalLM(tiny_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    loaded = KeyeMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def _edit_checkpoint(path, edit):
    files = checkpoint_files(path)
    for shard in set(files.values()):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard)
        keys = list(tensors)
        index = json.loads((path / INDEX_NAME).read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
        index["weight_map"].update(dict.fromkeys(keys, shard.name))
        (path / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.weight", None),
         "missing 1 tensor.*experts.3.down_proj"),
        (lambda t: t.pop("model.norm.weight", None), r"missing 1 tensor\(s\): model.norm.weight"),
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})
         if "model.norm.weight" in t else None,
         "unexpected 1 tensor.*model.layers.0.mlp.extra.weight"),
        (lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 64)})
         if "model.layers.1.self_attn.q_proj.weight" in t else None,
         r"shape mismatch.*model.layers.1.self_attn.q_proj.weight: checkpoint \[3, 64\], model \[64, 64\]"),
    ],
)  # fmt: skip
def test_bad_checkpoints_fail_naming_the_tensor(tiny_model, tmp_path, edit, message):
    tiny_model.save_pretrained(tmp_path, max_shard_size="30KB")
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        KeyeMoeForCausalLM.from_pretrained(tmp_path)


def test_single_file_checkpoint_and_missing_files(tiny_model, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.config.to_hf_config()))
    assert same_state(KeyeMoeForCausalLM.from_pretrained(tmp_path), tiny_model)
    with pytest.raises(FileNotFoundError, match="config.json"):
        KeyeMoeForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_loading_is_lazy_one_tensor_at_a_time(tiny_model, tmp_path, monkeypatch):
    """Each checkpoint tensor is read once, straight into its already-materialized parameter."""
    tiny_model.save_pretrained(tmp_path, max_shard_size="30KB")
    reads: list[str] = []
    original = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.inner = original(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr("keye_moe.checkpoint.safe_open", Spy)
    model = KeyeMoeForCausalLM.from_pretrained(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert sorted(reads) == sorted(index)
    assert not any(p.is_meta for p in model.parameters())


def test_expert_bias_is_optional_in_checkpoints(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cfg = tiny_model.config.replace(expert_bias=True)
    loaded = KeyeMoeForCausalLM.from_pretrained(tmp_path, config=cfg)
    bias = loaded.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.count_nonzero(bias) == 0
    with torch.no_grad():
        bias.fill_(0.5)
    loaded.save_pretrained(tmp_path / "again")
    with safe_open(str(next((tmp_path / "again").glob("*.safetensors"))), "pt") as f:
        assert "model.layers.0.mlp.gate.e_score_correction_bias" in set(f.keys())
    again = KeyeMoeForCausalLM.from_pretrained(tmp_path / "again")
    assert (
        again.config.expert_bias and float(again.model.layers[0].mlp.gate.e_score_correction_bias[0]) == 0.5
    )
