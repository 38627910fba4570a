"""KeyeViT: parity with transformers' SiglipVisionModel, Patch n' Pack exactness, RoPE, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keye_vision import KeyeViT, VisionConfig, load_vision_weights
from keye_vision.rope import apply_rope, rope_cos_sin

P = 14


def _patches_of(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B * h * w, C*P*P], patches row-major, each in (C, P, P) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * P * P)


@pytest.fixture(scope="module")
def tiny() -> KeyeViT:
    torch.manual_seed(0)
    model = KeyeViT(VisionConfig.preset("tiny")).eval()
    with torch.no_grad():  # a non-trivial position table
        model.embeddings.position_embedding.weight.normal_()
    return model


def test_matches_transformers_siglip(checkpoint_writer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.SiglipVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=84, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    # Released names (SigLIP head included); transformers 5 drops the "vision_model." level, 4.x keeps it.
    tensors = {
        f"visual.vision_model.{k.removeprefix('vision_model.')}": v for k, v in hf.state_dict().items()
    }
    path = checkpoint_writer(tensors, {"vision_config": cfg.to_dict(), "hidden_size": 32})
    ours = KeyeViT.from_pretrained(
        path, config=VisionConfig.from_dict({**cfg.to_dict(), "use_rope": False})
    ).eval()
    images = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        want = hf(pixel_values=images).last_hidden_state.reshape(-1, 64)
        got = ours(_patches_of(images), torch.tensor([[1, 6, 6], [1, 6, 6]]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = load_vision_weights(ours, path)["vision"]
    assert not report.missing and not report.unexpected
    assert any(n.startswith("head.") for n in report.ignored)


def test_packed_equals_one_by_one(tiny):
    grids = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 8, 4], [1, 1, 1], [3, 6, 2]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * P * P)
    with torch.no_grad():
        packed = tiny(pixels, grids)
        parts, start = [], 0
        for g in grids:
            n = int(g.prod())
            parts.append(tiny(pixels[start : start + n], g[None]))
            start += n
    torch.testing.assert_close(packed, torch.cat(parts), rtol=1e-5, atol=1e-5)


def test_frames_of_one_item_are_separate_blocks(tiny):
    """A t=2 item equals its two frames as two t=1 items (attention per frame, table per frame)."""
    pixels = torch.randn(2 * 12, 3 * P * P)
    with torch.no_grad():
        a = tiny(pixels, torch.tensor([[2, 3, 4]]))
        b = tiny(pixels, torch.tensor([[1, 3, 4], [1, 3, 4]]))
    torch.testing.assert_close(a, b)


def test_reference_backend_matches_cpu_path_forward_and_backward(tiny):
    grids = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * P * P)
    outs, grads = [], []
    for backend in ("reference", "sdpa"):
        tiny.zero_grad()
        out = tiny(pixels, grids, attn_backend=backend)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in tiny.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tiny.zero_grad()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = KeyeViT(VisionConfig.preset("tiny"))
    grids = torch.tensor([[1, 4, 4], [1, 2, 6]])
    pixels = torch.randn(28, 3 * P * P)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(pixels, grids).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_position_table_is_bilinearly_resized(tiny):
    table = tiny.embeddings.position_embedding.weight.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(3, 7), mode="bilinear", align_corners=False)
    got = tiny.embeddings.position_table(3, 7)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(21, -1))
    torch.testing.assert_close(
        tiny.embeddings.position_table(4, 4), tiny.embeddings.position_embedding.weight
    )


def test_rope_rotates_rows_and_columns_relatively():
    """q.k after 2-D RoPE depends only on the (row, col) offset between the two patches."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(pq, pk):
        cq = rope_cos_sin(torch.tensor([pq[0]]), torch.tensor([pq[1]]), 16, 10000.0)
        ck = rope_cos_sin(torch.tensor([pk[0]]), torch.tensor([pk[1]]), 16, 10000.0)
        return (apply_rope(q, *cq) * apply_rope(k, *ck)).sum()

    torch.testing.assert_close(score((2, 3), (5, 1)), score((4, 7), (7, 5)))
    assert not torch.allclose(score((2, 3), (5, 1)), score((2, 3), (1, 5)))
    # rows use the first quarter of frequencies of each half, columns the second
    cos, _ = rope_cos_sin(torch.tensor([0]), torch.tensor([1]), 16, 10000.0)
    assert torch.all(cos[0, 0, :4] == 1) and not torch.all(cos[0, 0, 4:8] == 1)


def test_rope_switch_changes_the_output(tiny):
    grids = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, 3 * P * P)
    off = KeyeViT(VisionConfig.preset("tiny", use_rope=False)).eval()
    off.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        assert not torch.allclose(tiny(pixels, grids), off(pixels, grids))


def test_bad_inputs_are_named(tiny):
    with pytest.raises(ValueError, match=r"pixel_values must be \[total_patches, 588\]"):
        tiny(torch.randn(16, 500), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="describes 16 patches but pixel_values has 15"):
        tiny(torch.randn(15, 588), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw must be an integer \[num_items, 3\]"):
        tiny(torch.randn(16, 588), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="grid_thw entries must be positive"):
        tiny(torch.randn(16, 588), torch.tensor([[1, 4, 4], [0, 2, 2]]))


def test_config_presets_and_errors():
    so400m = VisionConfig.preset("siglip-so400m")
    assert (so400m.hidden_size, so400m.num_hidden_layers, so400m.num_attention_heads) == (1152, 27, 16)
    assert (so400m.intermediate_size, so400m.position_grid, so400m.head_dim) == (4304, 27, 72)
    assert so400m.hidden_act == "gelu_pytorch_tanh" and so400m.layer_norm_eps == 1e-6 and so400m.use_rope
    n = sum(p.numel() for p in KeyeViT(VisionConfig.preset("tiny")).parameters())
    assert n > 0
    with pytest.raises(ValueError, match="unknown vision preset 'huge'"):
        VisionConfig.preset("huge")
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        VisionConfig(hidden_size=60, num_attention_heads=10)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        VisionConfig(hidden_act="relu6")
    assert VisionConfig.from_dict({**so400m.to_dict(), "model_type": "siglip"}) == so400m
