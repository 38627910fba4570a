"""KeyeVLForConditionalGeneration: vision tokens, registry lookup, packing, generation, the 30B preset."""

import copy

import pytest
import torch

from keye_train.config import KeyeVLConfig
from keye_train.modeling import KeyeVLForConditionalGeneration, TextDeltas
from keye_train.processor import KeyeProcessor
from keye_train.registry import plugin_host

# small budgets keep the CPU tests fast; the token arithmetic is the same at any size
IMAGE_PART = {"max_pixels": 160 * 28 * 28}
VIDEO_PART = {"max_pixels": 24 * 28 * 28, "min_pixels": 4 * 28 * 28, "total_pixels": 200 * 28 * 28}


def tiny_model(seed: int = 0, **text_overrides) -> KeyeVLForConditionalGeneration:
    config = KeyeVLConfig.preset("tiny")
    if text_overrides:
        config = config.replace(text_config=config.text_config.replace(**text_overrides))
    torch.manual_seed(seed)
    return KeyeVLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def processor():
    return KeyeProcessor()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An image and a video of odd sizes and length, written by the sample-media generator."""
    import sample_media

    root = tmp_path_factory.mktemp("media")
    image = sample_media.write_image(root / "odd.png", 333, 217, seed=1)
    spec = sample_media.VideoSpec(seconds=3.3, fps=10.0, width=194, height=146, scene_changes=(1.7,))
    video = sample_media.write_video(root / "odd.mp4", spec)
    return {"image": str(image), "video": str(video)}


def chat(media, answer=None):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": media["image"], **IMAGE_PART},
                {"type": "text", "text": "Now the video."},
                {"type": "video", "video": media["video"], **VIDEO_PART},
                {"type": "text", "text": "When does the red square appear?"},
            ],
        }
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_pad_counts_equal_the_vision_tower_output(model, processor, media):
    enc = processor.encode_chat(chat(media))
    ids = enc.input_ids
    is_pad = (ids == processor.image_token_id) | (ids == processor.video_token_id)
    with torch.no_grad():
        vision = model.vision_embeddings(enc.pixel_values, enc.grid_thw)
    assert vision.shape == (int(is_pad.sum()), model.config.hidden_size)
    # the odd-sized image and every sampled frame: one item each, merged tokens = (h/28) * (w/28)
    frames = int((ids == processor.tokenizer.ids.frame).sum())
    assert enc.grid_thw.shape[0] == 1 + frames and frames >= 6
    assert int((ids == processor.image_token_id).sum()) == int(enc.grid_thw[0].prod()) // 4


@pytest.mark.parametrize(("width", "height", "seconds"), [(97, 451, 1.1), (1001, 59, 2.7), (255, 255, 0.9)])
def test_pad_counts_for_more_odd_sizes_and_lengths(model, processor, tmp_path, width, height, seconds):
    import sample_media

    image = sample_media.write_image(tmp_path / "i.png", width, height, seed=2)
    spec = sample_media.VideoSpec(seconds=seconds, fps=7.0, width=130, height=98)
    video = sample_media.write_video(tmp_path / "v.mp4", spec)
    enc = processor.encode_chat(chat({"image": str(image), "video": str(video)}))
    is_pad = (enc.input_ids == processor.image_token_id) | (enc.input_ids == processor.video_token_id)
    with torch.no_grad():
        assert model.vision_embeddings(enc.pixel_values, enc.grid_thw).shape[0] == int(is_pad.sum())
        model.embed(enc.input_ids[None], enc.pixel_values, enc.grid_thw)  # every run matches its item


def test_mismatched_pad_counts_raise_instead_of_misaligning(model, processor, media):
    enc = processor.encode_chat(chat(media))
    ids = enc.input_ids[None]
    first_pad = int((ids[0] == processor.image_token_id).nonzero()[0])
    short = torch.cat([ids[:, :first_pad], ids[:, first_pad + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"pad runs of lengths .* makes the projector emit"):
        model.embed(short, enc.pixel_values, enc.grid_thw)
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model.embed(ids)
    wrong_grid = enc.grid_thw.clone()
    wrong_grid[0, 1] += 2
    with pytest.raises(ValueError, match="makes the projector emit"):
        model.embed(ids, enc.pixel_values, wrong_grid)


def test_positions_from_the_model_equal_the_processors(model, processor, media):
    batch = processor([chat(media, "At 1.0 s."), [{"role": "user", "content": "Hi"}]])
    computed = model.position_ids(batch["input_ids"], batch["grid_thw"], batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(computed[:, mask], batch["position_ids"][:, mask])
    samples = [
        processor.encode_chat(c) for c in (chat(media), [{"role": "user", "content": "Hi"}], chat(media))
    ]
    packed = processor.collate(samples, packing=True)
    computed = model.position_ids(packed["input_ids"], packed["grid_thw"], cu_seqlens=packed["cu_seqlens"])
    assert torch.equal(computed, packed["position_ids"])


def test_packed_batch_equals_padded_batch(model, processor, media):
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    samples = [processor.encode_chat(chat(media, "From 1.0 to 2.5 seconds.")), processor.encode_chat(hello)]
    with torch.no_grad():
        packed = model(**processor.collate(samples, packing=True))
        padded = model(**processor.collate(samples))
    mask = processor.collate(samples)["attention_mask"].bool()
    assert torch.allclose(packed.logits[0], padded.logits[mask], atol=1e-5, rtol=1e-5)
    # the LM loss only counts assistant tokens; both layouts see the same ones
    assert torch.allclose(packed.loss, padded.loss, atol=1e-5)


def test_training_step_reaches_every_part(processor, media):
    model = tiny_model().train()
    batch = processor([chat(media, "From 1.0 to 2.5 seconds.")])
    reference = model(**batch)
    model.gradient_checkpointing_enable()
    out = model(**batch)
    assert torch.allclose(out.loss, reference.loss)
    out.loss.backward()
    assert copy.deepcopy(model).decoder.model is not model.model  # a copy shares nothing ...
    twin = copy.deepcopy(model)
    assert twin.decoder.model is twin.model and twin.decoder.training  # ... but keeps its own wiring
    for part in (model.visual, model.mlp_AR, model.model.embed_tokens, model.lm_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(p.grad.abs().sum()) > 0 for p in model.visual.parameters())


@pytest.mark.parametrize("attn", ["sdpa", "dsa"])
def test_cached_generation_equals_recomputation(processor, media, attn):
    if attn == "dsa":
        pytest.importorskip("keye_dsa")
    model = tiny_model(attn_implementation=attn)
    prompts = [chat(media), [{"role": "user", "content": "Say something."}]]
    batch = processor(prompts, add_generation_prompt=True)
    if attn == "dsa":  # the prompt is longer than top-k: the indexer really selects
        assert batch["input_ids"].shape[1] > model.config.text_config.sa_config["topk"]
    cached = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    recomputed = model.generate(**batch, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert cached.shape == (2, 6) and torch.equal(cached, recomputed)
    # the first token is the argmax of a plain forward over the prompt
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    assert torch.equal(cached[:, 0], logits.argmax(-1))


def test_chat_helper_returns_reply_text(processor):
    model = tiny_model()
    hi = [{"role": "user", "content": "Hi"}]
    reply = model.chat(hi, processor=processor, max_new_tokens=5, eos_token_id=[])
    batch = processor(hi, add_generation_prompt=True)
    expected = processor.decode(model.generate(**batch, max_new_tokens=5, eos_token_id=[])[0])
    assert isinstance(reply, str) and reply == expected
    # stop strings work without a decode callback: the helper passes the processor's
    unstopped = model.chat(hi, processor=processor, max_new_tokens=5, eos_token_id=[], stop_strings=["\x00"])
    assert unstopped == reply
    with pytest.raises(ValueError, match="left-padded"):
        prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b c d e"}]]
        model.generate(**processor(prompts, add_generation_prompt=True, padding_side="right"))


def test_chat_streams_deltas_that_add_up_to_the_reply(processor):
    model = tiny_model()
    hi = [{"role": "user", "content": "Hi"}]
    deltas = []
    reply = model.chat(hi, processor=processor, max_new_tokens=12, eos_token_id=[], stream=deltas.append)
    assert "".join(deltas) == reply == model.chat(hi, processor=processor, max_new_tokens=12, eos_token_id=[])
    assert len(deltas) > 1 and all(deltas)  # sent as generated, not once at the end
    with pytest.raises(ValueError, match="not both"):
        model.chat(hi, processor=processor, stream=print, streamer=print)


def test_text_deltas_never_split_a_character(processor):
    text = "Café 世界 🙂 done"
    ids = processor.tokenizer.encode(text)
    assert any(processor.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))  # bytes do split
    deltas = []
    stream = TextDeltas(processor.decode, deltas.append)
    for i in ids:
        stream(torch.tensor([i]))
    stream.close()
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "世" in deltas and "🙂" in deltas  # released as soon as the last byte arrives


def test_components_come_from_the_registries():
    import pluggy

    built = []

    class Plugin:
        @pluggy.HookimplMarker("keye")
        def keye_vision_encoders(self):
            from keye_vision import KeyeViT

            def factory(config):
                built.append(config)
                return KeyeViT(config)

            return {"test-vit": factory}

    host = plugin_host()
    host.register(Plugin(), name="test-vit-plugin")
    try:
        config = KeyeVLConfig.preset("tiny", vision_encoder="test-vit")
        model = KeyeVLForConditionalGeneration(config)
        assert built == [config.vision_config] and model.visual.vision_model.config is config.vision_config
    finally:
        host.manager.unregister(name="test-vit-plugin")
        del host.infos["test-vit-plugin"]
    with pytest.raises(Exception, match="no vision encoder named 'test-vit'; available: keye-vit"):
        KeyeVLForConditionalGeneration(config)


def test_full_preset_builds_on_meta_with_its_parameter_count():
    counts = KeyeVLForConditionalGeneration.parameter_counts(KeyeVLConfig.preset("keye-vl-2.0-30b-a3b"))
    assert abs(counts["decoder"] / 30.5e9 - 1) < 0.01  # Qwen3-30B-A3B plus the DSA indexers
    assert abs(counts["vision"] / 0.413e9 - 1) < 0.01  # SigLIP so400m without its pooling head
    assert counts["projector"] == 4608 * 4608 + 4608 + 4608 * 2048 + 2048 + 2 * 4608
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["decoder"]
