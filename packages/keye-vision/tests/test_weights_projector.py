"""Loading from composite checkpoints by prefix, the projector's merge order, the plugin hook."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F

from keye_vision import KeyeViT, Projector, VisionConfig, load_prefixed, load_vision_weights
from keye_vision.projector import merge_index


def _composite(vit: KeyeViT, projector: Projector) -> dict[str, torch.Tensor]:
    """What a Keye checkpoint holds: decoder, ViT, projector and tensors the ViT does not use."""
    tensors = {f"visual.vision_model.{k}": v.clone() for k, v in vit.state_dict().items()}
    tensors |= {f"mlp_AR.{k}": v.clone() for k, v in projector.state_dict().items()}
    tensors["model.embed_tokens.weight"] = torch.randn(10, 32)
    tensors["visual.vision_model.embeddings.packing_position_embedding.weight"] = torch.randn(8, 64)
    tensors["visual.vision_model.head.probe"] = torch.randn(1, 1, 64)
    return tensors


def _config(cfg: VisionConfig) -> dict:
    return {"hidden_size": 32, "vision_config": cfg.to_dict()}


def test_vit_and_projector_load_from_sharded_checkpoint(checkpoint_writer):
    torch.manual_seed(0)
    cfg = VisionConfig.preset("tiny")
    vit, projector = KeyeViT(cfg), Projector(64, 32)
    path = checkpoint_writer(_composite(vit, projector), _config(cfg), shards=3)
    vit2 = KeyeViT.from_pretrained(path)
    proj2 = Projector.from_pretrained(path)
    for a, b in ((vit, vit2), (projector, proj2)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    fresh_vit, fresh_proj = KeyeViT(cfg), Projector(64, 32)
    reports = load_vision_weights(fresh_vit, path, fresh_proj)
    assert reports["vision"].ignored == ["embeddings.packing_position_embedding.weight", "head.probe"]
    assert not reports["vision"].missing and not reports["projector"].unexpected
    assert len(reports["projector"].loaded) == 6


def test_single_file_checkpoint_and_missing_unexpected_names(checkpoint_writer):
    cfg = VisionConfig.preset("tiny")
    tensors = _composite(KeyeViT(cfg), Projector(64, 32))
    del tensors["visual.vision_model.post_layernorm.weight"]
    tensors["visual.vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(1)
    path = checkpoint_writer(tensors, _config(cfg), shards=1)
    (path / "model-00001-of-00001.safetensors").rename(path / "model.safetensors")
    (path / "model.safetensors.index.json").unlink()
    report = load_prefixed(KeyeViT(cfg), path, "visual.vision_model.")
    assert report.missing == ["post_layernorm.weight"]
    assert report.unexpected == ["encoder.layers.9.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing \['post_layernorm.weight'\], unexpected"):
        KeyeViT.from_pretrained(path)


def test_misshaped_tensor_is_refused_before_copying(checkpoint_writer):
    cfg = VisionConfig.preset("tiny")
    tensors = _composite(KeyeViT(cfg), Projector(64, 32))
    tensors["visual.vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    path = checkpoint_writer(tensors, _config(cfg))
    target = KeyeViT(cfg)
    before = target.embeddings.patch_embedding.weight.clone()
    with pytest.raises(
        ValueError, match=r"encoder.layers.0.mlp.fc1.weight: checkpoint \(7, 64\) vs model \(128, 64\)"
    ):
        load_prefixed(target, path, "visual.vision_model.")
    assert torch.equal(before, target.embeddings.patch_embedding.weight)


def test_missing_checkpoint_files_are_named(tmp_path, checkpoint_writer):
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json or model.safetensors"):
        load_prefixed(KeyeViT(VisionConfig.preset("tiny")), tmp_path, "visual.vision_model.")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        KeyeViT.from_pretrained(tmp_path)
    cfg = VisionConfig.preset("tiny")
    path = checkpoint_writer(_composite(KeyeViT(cfg), Projector(64, 32)), _config(cfg))
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors named by the index"):
        KeyeViT.from_pretrained(path)


def test_projector_merges_2x2_neighbours_of_the_row_major_grid():
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    feats = torch.randn(32, 8)
    proj = Projector(8, 5)
    got = proj(feats, grid)
    # by hand: item 0 is a 4 x 6 grid; merged token (i, j) takes rows 2i..2i+1, cols 2j..2j+1
    img = feats[:24].reshape(4, 6, 8)
    manual = [torch.cat([img[r, c], img[r, c + 1], img[r + 1, c], img[r + 1, c + 1]])
              for r in range(0, 4, 2) for c in range(0, 6, 2)]  # fmt: skip
    manual += [feats[24 + 4 * f : 28 + 4 * f].reshape(-1) for f in range(2)]  # 2x2 frames: one token each
    x = torch.stack(manual)
    want = proj.linear_2(
        F.gelu(proj.linear_1(F.layer_norm(x, (32,), proj.pre_norm.weight, proj.pre_norm.bias, 1e-5)))
    )
    torch.testing.assert_close(got, want)
    assert merge_index(grid).sort().values.equal(torch.arange(32))


def test_projector_rejects_odd_grids_and_wrong_lengths():
    proj = Projector(8, 5)
    with pytest.raises(ValueError, match=r"grid \(1, 3, 4\) cannot be merged 2x2"):
        proj(torch.randn(12, 8), torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="describes 16 patches but features has 15"):
        proj(torch.randn(15, 8), torch.tensor([[1, 4, 4]]))


def test_plugin_registers_keye_vit():
    eps = [ep for ep in entry_points(group="keye") if ep.name == "keye-vision"]
    assert eps, "keye-vision must declare its `keye` entry point"
    plugin = eps[0].load()
    factories = plugin.keye_vision_encoders()
    model = factories["keye-vit"](VisionConfig.preset("tiny"))
    assert isinstance(model, KeyeViT)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    assert factories["keye-vit"]({**small, "image_size": 28}).config.hidden_size == 32
    with pytest.raises(TypeError, match="keye-vit needs a VisionConfig"):
        factories["keye-vit"](3)
