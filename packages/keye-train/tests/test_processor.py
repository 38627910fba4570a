"""KeyeProcessor: pad-token expansion, labels, positions, patches and batching (media given as frames)."""

import pytest
import torch

from keye_train.chat import render_chat
from keye_train.processor import IGNORE_INDEX, KeyeProcessor, VisionFrame


@pytest.fixture(scope="module")
def processor():
    return KeyeProcessor()


def frame(h, w, timestamp=None, fast=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return VisionFrame(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), timestamp, fast)


CHAT = [
    {"role": "system", "content": "Answer with times."},
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "img"},
            {"type": "text", "text": "Compare with"},
            {"type": "video", "video": "vid"},
            {"type": "text", "text": "When does the square appear?"},
        ],
    },
    {"role": "assistant", "content": "From 0.5 to 1.5 seconds."},
    {"role": "user", "content": "And the circle?"},
    {"role": "assistant", "content": "It never appears."},
]
MEDIA = [
    [frame(28 * 3, 28 * 5)],
    [frame(56, 84, 0.0), frame(28, 28, 0.5, fast=True, seed=1), frame(56, 84, 1.0, seed=2)],
]


def test_pad_tokens_per_item_and_video_layout(processor):
    enc = processor.encode_pieces(render_chat(CHAT), MEDIA)
    ids = enc.input_ids.tolist()
    assert ids.count(processor.image_token_id) == 3 * 5
    assert ids.count(processor.video_token_id) == 2 * 3 + 1 + 2 * 3
    text = processor.decode(ids, skip_special_tokens=False)
    pads = "<|video_pad|>"
    assert (
        f"<|vision_start|><|frame|>0.0{pads * 6}<|frame|>0.5<|fast_start|>{pads}<|fast_end|>"
        f"<|frame|>1.0{pads * 6}<|vision_end|>"
    ) in text
    assert enc.grid_thw.tolist() == [[1, 6, 10], [1, 4, 6], [1, 2, 2], [1, 4, 6]]
    assert enc.pixel_values.shape == (int(enc.grid_thw.prod(-1).sum()), 3 * 14 * 14)


def test_labels_are_exactly_the_assistant_turns(processor):
    enc = processor.encode_pieces(render_chat(CHAT), MEDIA)
    kept = enc.labels != IGNORE_INDEX
    assert torch.equal(enc.labels[kept], enc.input_ids[kept])
    trained = processor.decode(enc.labels[kept], skip_special_tokens=False)
    assert trained == "From 0.5 to 1.5 seconds.<|im_end|><think>\n\n</think>\n\nIt never appears.<|im_end|>"
    # every assistant turn's tokens, and nothing else, is kept: the untrained text is the rest
    untrained = processor.decode(enc.input_ids[~kept], skip_special_tokens=False)
    assert "seconds" not in untrained and "never" not in untrained
    assert untrained.count("<|im_start|>assistant\n") == 2


def test_positions_resume_after_vision(processor):
    enc = processor.encode_pieces(render_chat(CHAT), MEDIA)
    pos = enc.position_ids
    is_pad = (enc.input_ids == processor.image_token_id) | (enc.input_ids == processor.video_token_id)
    assert torch.equal(pos[0][~is_pad], pos[1][~is_pad]) and torch.equal(pos[1][~is_pad], pos[2][~is_pad])
    text_pos = pos[0][~is_pad]
    assert bool((text_pos[1:] > text_pos[:-1]).all())
    assert enc.rope_delta == int(pos.max()) + 1 - len(enc)
    first = int(is_pad.nonzero()[0])  # the image: rows 0..2, columns 0..4 around one start
    block = pos[:, first : first + 15]
    start = int(pos[0, first - 1]) + 1
    assert block[0].eq(start).all()
    assert block[1].tolist() == [start + r for r in range(3) for _ in range(5)]
    assert block[2].tolist() == [start + c for _ in range(3) for c in range(5)]


def test_padding_and_packing_agree(processor):
    short = processor.encode_pieces(render_chat([{"role": "user", "content": "Hi"}]), [])
    long = processor.encode_pieces(render_chat(CHAT), MEDIA)
    for side in ("left", "right"):
        batch = processor.collate([short, long], padding_side=side)
        mask = batch["attention_mask"].bool()
        assert mask.sum(1).tolist() == [len(short), len(long)]
        assert torch.equal(batch["input_ids"][0][mask[0]], short.input_ids)
        assert torch.equal(batch["position_ids"][:, 1][:, mask[1]], long.position_ids)
        assert bool((batch["labels"][~mask] == IGNORE_INDEX).all())
        assert not mask[0, -1 if side == "right" else 0]  # the short row is padded on its side
    packed = processor.collate([long, short], packing=True)
    assert packed["cu_seqlens"].tolist() == [0, len(long), len(long) + len(short)]
    assert packed["cu_seqlens"].dtype == torch.int32
    assert torch.equal(packed["input_ids"][0], torch.cat([long.input_ids, short.input_ids]))
    assert torch.equal(packed["position_ids"][:, 0, len(long) :], short.position_ids)
    assert torch.equal(packed["pixel_values"], long.pixel_values)
    assert processor.collate([short], pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


def test_bad_inputs_are_named(processor):
    with pytest.raises(ValueError, match="literal <\\|image_pad\\|>"):
        processor.encode_pieces(render_chat([{"role": "user", "content": "x<|image_pad|>"}]), [])
    with pytest.raises(ValueError, match="holds 1 image/video parts but 0 were loaded"):
        processor.encode_pieces(render_chat(CHAT[1:2])[:2], [])
    with pytest.raises(ValueError, match="every video frame needs a timestamp"):
        processor.encode_pieces(render_chat(CHAT), [MEDIA[0], [frame(28, 28)]])
    with pytest.raises(ValueError, match="collate needs at least one sample"):
        processor.collate([])
    with pytest.raises(ValueError, match="one timestamp and one frame type per frame"):
        processor.load_media({"type": "video", "video": [frame(28, 28).pixels], "timestamps": []})


def test_predecoded_video_part_and_save_load(processor, tmp_path):
    frames = processor.load_media(
        {
            "type": "video",
            "video": [f.pixels for f in MEDIA[1]],
            "timestamps": [0.0, 0.5, 1.0],
            "frame_types": ["slow", "fast", "slow"],
        }
    )
    assert [f.fast for f in frames] == [False, True, False] and frames[2].timestamp == 1.0
    processor.config.video_fps = 1.0
    try:
        processor.save_pretrained(tmp_path)
        again = KeyeProcessor.from_pretrained(tmp_path)
    finally:
        processor.config.video_fps = 2.0
    assert again.config.video_fps == 1.0 and again.tokenizer.ids == processor.tokenizer.ids
