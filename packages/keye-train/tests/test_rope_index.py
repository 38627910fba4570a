"""M-RoPE positions against transformers' Qwen2-VL get_rope_index (frames as t=1 grids)."""

import random
from types import SimpleNamespace

import pytest
import torch

from keye_train.rope_index import rope_index

IMAGE, VIDEO, TEXT = 9, 10, 5


def random_layout(rng):
    ids, grids, types = [], [], []
    for _ in range(rng.randint(1, 5)):
        n_text = rng.randint(0, 4) if ids else rng.randint(1, 4)
        ids += [TEXT] * n_text
        types += [0] * n_text
        h, w = rng.randint(1, 4), rng.randint(1, 5)
        pad, kind = (IMAGE, 1) if rng.random() < 0.5 else (VIDEO, 2)
        ids += [pad] * (h * w)
        types += [kind] * (h * w)
        grids.append((kind, h, w))
        ids.append(TEXT)  # a vision span always ends with <|vision_end|>
        types.append(0)
    tail = rng.randint(0, 3)
    return ids + [TEXT] * tail, types + [0] * tail, grids


def reference(ids, types, grids):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    merge = 2
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=merge)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen2VLModel.get_vision_position_ids(fake, *a, **k)
    image = torch.tensor([[1, h * merge, w * merge] for k, h, w in grids if k == 1]).reshape(-1, 3)
    video = torch.tensor([[1, h * merge, w * merge] for k, h, w in grids if k == 2]).reshape(-1, 3)
    positions, delta = Qwen2VLModel.get_rope_index(
        fake, torch.tensor([ids]), torch.tensor([types]), image_grid_thw=image, video_grid_thw=video
    )
    return positions[:, 0], int(delta)


@pytest.mark.parametrize("seed", range(20))
def test_matches_qwen2vl_reference(seed):
    ids, types, grids = random_layout(random.Random(seed))
    ours, delta = rope_index(ids, [(h, w) for _, h, w in grids], (IMAGE, VIDEO))
    expected, expected_delta = reference(ids, types, grids)
    assert torch.equal(ours, expected)
    assert delta == expected_delta


def test_text_only_is_arange_with_zero_delta():
    positions, delta = rope_index([TEXT] * 7, [], (IMAGE, VIDEO))
    assert torch.equal(positions, torch.arange(7).expand(3, -1)) and delta == 0


def test_count_mismatch_and_broken_runs_are_errors():
    with pytest.raises(ValueError, match="hold 3 vision pad tokens but the grids"):
        rope_index([TEXT, IMAGE, IMAGE, IMAGE], [(1, 2)], (IMAGE, VIDEO))
    with pytest.raises(ValueError, match="contiguous pad tokens"):
        rope_index([IMAGE, TEXT, IMAGE], [(1, 2)], (IMAGE, VIDEO))
