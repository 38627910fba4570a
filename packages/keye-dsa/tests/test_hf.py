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
