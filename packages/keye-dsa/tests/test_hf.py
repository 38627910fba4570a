import pytest
import torch

transformers = pytest.importorskip("transformers")

from keye_dsa import patch_model, set_dsa_mode, unpatch_model  # noqa: E402


def _tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.Qwen3ForCausalLM(config).eval()


def _batch():
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_full_topk_gives_the_same_logits_and_generations(force_impl, impl):
    force_impl(impl)
    model = _tiny_qwen3()
    ids, mask = _batch()
    logits = model(ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    patch_model(model, topk=64, num_heads=2, head_dim=8)
    layer = model.model.layers[0].self_attn
    assert set(dict(layer.sa_indexer.named_parameters())) == {
        "q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight", "k_norm.bias"
    }  # fmt: skip
    patched = model(ids, attention_mask=mask).logits
    assert torch.allclose(patched[1], logits[1], atol=1e-5)
    assert torch.allclose(patched[0, 3:], logits[0, 3:], atol=1e-5)  # real tokens of the padded row
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), generated)
    for block in model.model.layers:
        block.self_attn.sa_indexer.topk = 3
    assert not torch.allclose(model(ids, attention_mask=mask).logits[1], logits[1], atol=1e-3)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False).shape == (2, 14)
    unpatch_model(model)
    assert not hasattr(layer, "sa_indexer")
    assert torch.equal(model(ids, attention_mask=mask).logits, logits)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)


@pytest.mark.parametrize(
    ("impl", "prompt"), [("reference", 11), ("triton", 11), ("reference", 20), ("triton", 20)]
)
def test_static_cache_generates_as_the_dynamic_cache(force_impl, impl, prompt):
    """``generate(cache_implementation="static")``: the index keys ride on transformers' static layers
    (rows and length from their device-side length), with left padding, top-k below the length, a prompt
    that prefills on the device path (<= 16 tokens) or the host path."""
    force_impl(impl)
    model = patch_model(_tiny_qwen3(), topk=3, num_heads=2, head_dim=8)
    ids = torch.randint(0, 97, (2, prompt), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[0, :3] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    dynamic = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), dynamic)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), dynamic)  # a fresh cache


def test_warmup_trains_only_the_indexer_and_its_loss_falls(force_impl):
    force_impl("reference")
    model = _tiny_qwen3(seed=2)
    patch_model(model, topk=4, num_heads=2, head_dim=8)
    set_dsa_mode(model, "dense_warmup")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "sa_indexer" not in n}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("sa_indexer" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=3e-2)
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(25):
        model(ids)
        loss = model.keye_dsa_aux_losses.pop("indexer_kl")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_patch_errors():
    with pytest.raises(ValueError, match="no Llama/Qwen-style attention"):
        patch_model(torch.nn.Linear(3, 3))
    model = patch_model(_tiny_qwen3(), topk=8, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64}
    scaled = _tiny_qwen3()
    scaled.config.rope_parameters = yarn
    with pytest.raises(ValueError, match=r"scales its RoPE \('yarn'\).*head_dim \(16\) must equal.*\(8\)"):
        patch_model(scaled, topk=8, num_heads=2, head_dim=16)


def _packed(seqs):
    """One row holding ``seqs`` back to back, with positions restarting at each (transformers' packing)."""
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    return ids, positions


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_packed_sequences_equal_their_separate_forwards(force_impl, impl):
    """A packed row (no attention mask, no cache: transformers' packed training format) must give each
    sequence exactly its own forward, with a top-k small enough that the selection matters."""
    force_impl(impl)
    model = patch_model(_tiny_qwen3(seed=4), topk=3, num_heads=2, head_dim=8)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 9, 1, 7)]
    alone = [model(s[None], use_cache=False).logits[0] for s in seqs]
    ids, positions = _packed(seqs)
    packed = model(ids, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    if impl == "triton":  # the kernels' varlen path is covered; the flattening below is impl-independent
        return
    # two packed rows in one batch: the rows are flattened into one packed sequence
    rows = [_packed(seqs[:2]), _packed([seqs[3], seqs[2], seqs[1][:6]])]
    both = model(torch.cat([r[0] for r in rows]), position_ids=torch.cat([r[1] for r in rows]),
                 use_cache=False).logits  # fmt: skip
    torch.testing.assert_close(both[0], torch.cat(alone[:2]), rtol=1e-5, atol=1e-5)
    tail = model(seqs[1][None, :6], use_cache=False).logits[0]
    torch.testing.assert_close(both[1], torch.cat([alone[3], alone[2], tail]), rtol=1e-5, atol=1e-5)


def test_left_padding_with_restarting_positions_keeps_real_tokens(force_impl):
    """Positions from a cumulative sum of the mask jump at the padding; the real tokens must still see
    exactly their own sequence."""
    force_impl("reference")
    model = patch_model(_tiny_qwen3(seed=6), topk=3, num_heads=2, head_dim=8)
    ids, mask = _batch()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    alone = model(ids[0:1, 3:], use_cache=False).logits
    torch.testing.assert_close(out[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(ids[1:2], use_cache=False).logits[0], rtol=1e-5, atol=1e-5)


def test_packing_that_the_mask_only_half_separates_is_refused():
    from keye_dsa.hf import _packed_bounds

    positions = torch.tensor([[0, 1, 0, 1, 0, 1]])
    causal = torch.ones(6, 6).tril().bool()
    assert _packed_bounds(positions, causal[None, None], 1, 6, 6) is None  # attends across: one sequence
    blocks = causal.clone()
    blocks[2:, :2] = False
    blocks[4:, :4] = False
    assert _packed_bounds(positions, blocks[None, None], 1, 6, 6).tolist() == [0, 2, 4, 6]
    blocks[4:, 2:4] = True
    with pytest.raises(ValueError, match="separates only some"):
        _packed_bounds(positions, blocks[None, None], 1, 6, 6)
