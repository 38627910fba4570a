from __future__ import annotations

import pytest
import torch

from keye_moe import KeyeMoeForCausalLM, KVCache, sample_next

from .conftest import tiny_config


def test_cached_forward_equals_full_forward(tiny_model):
    ids = torch.randint(0, 512, (2, 11))
    full = tiny_model(ids).logits
    cache = KVCache(tiny_model.config.num_hidden_layers)
    parts = [tiny_model(ids[:, :5], cache=cache).logits]
    for t in range(5, 11):
        parts.append(tiny_model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_cached_equals_uncached(tiny_model):
    ids = torch.randint(3, 512, (3, 7))
    fast = tiny_model.generate(ids, max_new_tokens=12, eos_token_id=[])
    slow = tiny_model.generate(ids, max_new_tokens=12, eos_token_id=[], use_cache=False)
    assert fast.shape == (3, 12) and torch.equal(fast, slow)


def test_left_padded_batch_equals_each_prompt_alone(tiny_model):
    prompts = [torch.randint(3, 512, (n,)) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p
        mask[r, width - len(p) :] = 1
    batch = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for r, p in enumerate(prompts):
        alone = tiny_model.generate(p[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batch[r], alone[0]), r
    uncached = tiny_model.generate(
        ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], use_cache=False
    )
    assert torch.equal(batch, uncached)


def test_stop_ids_and_strings_stop_each_row(tiny_model):
    ids = torch.randint(3, 512, (2, 5))
    free = tiny_model.generate(ids, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 3])
    out = tiny_model.generate(ids, max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == 0).all()

    def decode(tokens):
        return " ".join(f"t{x}" for x in tokens)

    target = f"t{int(free[1, 2])}"
    out = tiny_model.generate(ids, max_new_tokens=10, eos_token_id=[], stop_strings=[target], decode=decode)
    k = next(i for i in range(10) if target in decode(free[1, : i + 1].tolist()))
    assert torch.equal(out[1, : k + 1], free[1, : k + 1])
    with pytest.raises(ValueError, match="decode"):
        tiny_model.generate(ids, stop_strings=["x"])


def test_streamer_sees_each_step_and_its_columns_equal_the_result(tiny_model):
    prompts = [torch.randint(3, 512, (n,)) for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 7 - len(p) :] = p
        mask[r, 7 - len(p) :] = 1
    free = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    stop = int(free[1, 2])  # row 1 stops at step 3 at the latest; row 0 runs on, then pads
    streamed = []
    out = tiny_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        eos_token_id=stop,
        pad_token_id=1,
        streamer=lambda t: streamed.append(t.clone()),
    )
    assert all(t.shape == (2,) for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), out)
    first = int((out[1] == stop).nonzero()[0])
    assert first <= 2 and (out[1, first + 1 :] == 1).all()
    quiet = tiny_model.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stop, pad_token_id=1
    )
    assert torch.equal(quiet, out)  # streaming changes nothing
    assert tiny_model.generate(ids, max_new_tokens=0, streamer=streamed.append).shape == (2, 0)


def test_sampling_options():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, do_sample=True, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, do_sample=True, top_p=1e-6, generator=g), logits.argmax(-1))
    top5 = torch.topk(logits, 5).indices
    draws = torch.stack(
        [sample_next(logits, do_sample=True, top_k=5, temperature=2.0, generator=g) for _ in range(200)]
    )
    assert all(bool(torch.isin(draws[:, r], top5[r]).all()) for r in range(4))
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) <= 0.5
    draws = torch.stack([sample_next(logits, do_sample=True, top_p=0.5, generator=g) for _ in range(200)])
    for r in range(4):
        assert bool(torch.isin(draws[:, r], order[r][keep[r]]).all())
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, do_sample=True, temperature=0.0)


def test_sampled_generation_is_reproducible_and_cache_independent(tiny_model):
    ids = torch.randint(3, 512, (2, 4))
    kw = dict(max_new_tokens=6, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=[])
    a = tiny_model.generate(ids, generator=torch.Generator().manual_seed(5), **kw)
    b = tiny_model.generate(ids, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert torch.equal(a, b)


def test_inputs_embeds_equal_input_ids(tiny_model):
    ids = torch.randint(3, 512, (2, 6))
    embeds = tiny_model.model.embed_tokens(ids)
    torch.testing.assert_close(tiny_model(inputs_embeds=embeds).logits, tiny_model(ids).logits)
    a = tiny_model.generate(inputs_embeds=embeds, max_new_tokens=5, eos_token_id=[])
    b = tiny_model.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(ids, inputs_embeds=embeds)


def test_mrope_prompt_generation_cached_equals_uncached():
    torch.manual_seed(0)
    model = KeyeMoeForCausalLM(tiny_config(mrope_section=[2, 3, 3])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    b, t = 2, 10
    pos = torch.arange(t).repeat(3, b, 1)
    pos[1, :, 3:7] = torch.tensor([3, 3, 4, 4])  # a 2x2 "image" in the middle of the prompt
    pos[2, :, 3:7] = torch.tensor([3, 4, 3, 4])
    pos[0, :, 3:7] = 3
    pos[:, :, 7:] = torch.arange(5, 8)
    embeds = torch.randn(b, t, 64)
    fast = model.generate(inputs_embeds=embeds, position_ids=pos, max_new_tokens=6, eos_token_id=[])
    slow = model.generate(
        inputs_embeds=embeds, position_ids=pos, max_new_tokens=6, eos_token_id=[], use_cache=False
    )
    assert torch.equal(fast, slow)
    # text continuation after the prompt uses three equal rows starting past the largest position
    cache = KVCache(model.config.num_hidden_layers)
    model(inputs_embeds=embeds, position_ids=pos, cache=cache)
    assert cache.next_position.tolist() == [8, 8]


def test_bad_inputs_are_named(tiny_model):
    ids = torch.randint(0, 512, (2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model(ids, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_model(ids, position_ids=torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        tiny_model(ids, labels=ids[:, :3])
