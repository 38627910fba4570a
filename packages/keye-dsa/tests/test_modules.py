import importlib.metadata
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from keye_dsa import DSACache, DSAttention, LightningIndexer, select_topk, set_dsa_mode, sparse_attention
from keye_dsa.hadamard import hadamard_rotate
from keye_dsa.modules.cache import append_rows
from keye_dsa.rope import apply_rope, rope_cos_sin, scale_sections
from keye_dsa.testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # kernel tests: CUDA there, the interpreter here


def test_indexer_parameter_names_and_shapes():
    m = LightningIndexer(32, num_heads=4, head_dim=16, topk=8)
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names == {
        "q_proj.weight": (4 * 16 + 4, 32),
        "k_proj.weight": (16, 32),
        "q_norm.weight": (16,),
        "k_norm.weight": (16,),
        "k_norm.bias": (16,),
    }
    q, k, w = m(torch.randn(2, 5, 32))
    assert q.shape == (2, 5, 4, 16) and k.shape == (2, 5, 16) and w.shape == (2, 5, 4)
    with pytest.raises(ValueError, match="hidden_states must be"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="indexer mode"):
        m.mode = "warmup"


def test_mrope_sections_scale_and_text_rows_equal_plain_rope():
    assert scale_sections([16, 24, 24], 64, 128) == [8, 12, 12]
    assert scale_sections([16, 24, 24], 128, 128) == [16, 24, 24]
    with pytest.raises(ValueError, match="sum to head_dim"):
        scale_sections([16, 24, 20], 64, 128)
    m = LightningIndexer(32, 2, 16, 8, mrope_section=[16, 24, 24], decoder_head_dim=128)
    assert m.sections == [2, 3, 3]
    x = torch.randn(1, 6, 32)
    pos = torch.arange(6)[None]
    assert torch.equal(m(x, pos)[0], m(x, pos.expand(3, 1, 6))[0])  # text: three equal rows
    vision = torch.stack([pos, pos * 0, pos * 2])
    assert not torch.allclose(m(x, pos)[0], m(x, vision)[0])


def test_rope_keeps_relative_positions_and_hadamard_keeps_dots():
    cos, sin = rope_cos_sin(torch.arange(8)[None], 16, 10000.0)
    a, b = torch.randn(16), torch.randn(16)
    ra, rb = (apply_rope(x.expand(1, 8, 16), cos, sin)[0] for x in (a, b))
    assert torch.allclose(ra[3] @ rb[1], ra[6] @ rb[4], atol=1e-5)  # depends on the offset only
    x, y = torch.randn(5, 64), torch.randn(7, 64)
    assert torch.allclose(hadamard_rotate(x) @ hadamard_rotate(y).T, x @ y.T, atol=1e-5)
    rotated = LightningIndexer(32, 2, 16, 4, hadamard=True)
    plain = LightningIndexer(32, 2, 16, 4)
    plain.load_state_dict(rotated.state_dict())
    h = torch.randn(1, 9, 32)
    (qr, kr, _), (qp, kp, _) = rotated(h), plain(h)
    assert not torch.allclose(qr, qp)
    assert torch.allclose(qr @ kr[:, None].transpose(-1, -2), qp @ kp[:, None].transpose(-1, -2), atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.randn(3, 12))


def _dense_reference(attn: DSAttention, x: torch.Tensor) -> torch.Tensor:
    """The same layer with plain causal attention (its indexer switched off)."""
    mode = attn.sa_indexer.mode
    attn.sa_indexer.mode = "off"
    try:
        return attn(x)
    finally:
        attn.sa_indexer.mode = mode


def _layer(topk, seed=0, **kw):
    torch.manual_seed(seed)
    return DSAttention(48, 8, 2, 16, index_heads=2, index_head_dim=16, topk=topk, **kw)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_topk_at_least_length_equals_dense(force_impl, impl):
    force_impl(impl)
    attn = _layer(topk=16).to(DEVICE)
    x = torch.randn(2, 11, 48, device=DEVICE)
    assert rel_err(attn(x), _dense_reference(attn, x)) < 1e-5


def test_sparse_layer_matches_manual_pipeline(force_impl):
    force_impl("reference")
    attn = _layer(topk=4)
    x = torch.randn(1, 10, 48)
    got = attn(x)
    pos = torch.arange(10)[None]
    q = attn.q_norm(attn.q_proj(x).view(1, 10, 8, 16))
    k = attn.k_norm(attn.k_proj(x).view(1, 10, 2, 16))
    v = attn.v_proj(x).view(1, 10, 2, 16)
    cos, sin = rope_cos_sin(pos, 16, attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    qi, ki, w = attn.sa_indexer(x, pos)
    idx = select_topk(qi, ki, w, 4)
    want = attn.o_proj(sparse_attention(q, k, v, idx).reshape(1, 10, -1))
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, _dense_reference(attn, x)) > 1e-3  # sparse differs from dense


@pytest.mark.parametrize("topk", [4, 64])
def test_chunked_prefill_and_decode_match_full_forward(force_impl, topk):
    force_impl("reference")
    attn = _layer(topk=topk, seed=1).eval()
    x = torch.randn(2, 13, 48)
    full = attn(x)
    cache = DSACache()
    parts = [attn(x[:, :5], cache=cache), attn(x[:, 5:9], cache=cache)]
    parts += [attn(x[:, i : i + 1], cache=cache) for i in range(9, 13)]
    assert cache.seq_len() == 13 and cache.layer(0)["k_index"].shape == (2, 13, 16)
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


def test_left_padding_matches_unpadded_rows(force_impl):
    force_impl("triton")
    attn = _layer(topk=3, seed=2).to(DEVICE)
    x = torch.randn(1, 9, 48, device=DEVICE)
    padded = torch.cat([torch.randn(1, 4, 48, device=DEVICE), x], 1)
    mask = torch.tensor([[False] * 4 + [True] * 9], device=DEVICE)
    pos = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(9)])[None].to(DEVICE)
    got = attn(padded, pos, key_padding_mask=mask)[:, 4:]
    assert rel_err(got, attn(x)) < 1e-5
    with pytest.raises(ValueError, match="left padding only"):
        attn(padded, pos, key_padding_mask=mask.flip(1))


def test_packed_sequences_match_separate_calls(force_impl):
    force_impl("triton")
    attn = _layer(topk=3, seed=3).to(DEVICE)
    a, b = torch.randn(1, 6, 48, device=DEVICE), torch.randn(1, 8, 48, device=DEVICE)
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None].to(DEVICE)
    cu = torch.tensor([0, 6, 14], dtype=torch.int32, device=DEVICE)
    got = attn(torch.cat([a, b], 1), pos, cu_seqlens=cu)
    assert rel_err(got, torch.cat([attn(a), attn(b)], 1)) < 1e-5


def test_training_modes_route_losses_and_gradients(force_impl):
    force_impl("reference")
    attn = _layer(topk=4, seed=4)
    x = torch.randn(1, 12, 48)
    set_dsa_mode(attn, "dense_warmup")
    assert not attn.q_proj.weight.requires_grad and attn.sa_indexer.q_proj.weight.requires_grad
    aux = {}
    out = attn(x, aux_losses=aux)
    assert rel_err(out, _dense_reference(attn, x)) < 1e-6  # warm-up returns dense attention
    aux["indexer_kl"].backward()
    assert attn.sa_indexer.k_proj.weight.grad is not None
    set_dsa_mode(attn, "sparse", freeze_decoder=False)
    attn.zero_grad()
    aux = {}
    out = attn(x, aux_losses=aux)
    out.square().mean().backward()  # the LM-like loss never reaches the indexer
    assert attn.q_proj.weight.grad is not None and attn.sa_indexer.q_proj.weight.grad is None
    aux["indexer_kl"].backward()  # the KL reaches the indexer only
    assert attn.sa_indexer.q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="no LightningIndexer"):
        set_dsa_mode(torch.nn.Linear(2, 2), "sparse")


def test_plugin_registers_a_backend_with_the_protocol_shape(force_impl):
    force_impl("triton")
    eps = [e for e in importlib.metadata.entry_points(group="keye") if e.name == "dsa"]
    assert eps and eps[0].value == "keye_dsa.plugin"
    factory = eps[0].load().keye_attention_backends()["dsa"]
    config = SimpleNamespace(
        hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
        mrope_section=None, rms_norm_eps=1e-6,
        sa_config={"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 32},
    )  # fmt: skip
    backend = factory(config)
    assert backend.layer_module_name == "sa_indexer"
    layer = backend.make_layer_module(0)
    assert isinstance(layer, LightningIndexer) and layer.topk == 32 and layer.num_heads == 2
    q, k, v = torch.randn(2, 9, 8, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    inputs = SimpleNamespace(
        hidden_states=torch.randn(2, 9, 48), position_ids=torch.arange(9).expand(2, 9), scale=0.25,
        layer_idx=0,
        cu_seqlens=None, key_padding_mask=None, cache={}, aux_losses=None,
    )  # fmt: skip
    out = backend.attention(q, k, v, inputs, layer)
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    assert out.shape == (2, 9, 8, 16) and rel_err(out, dense) < 1e-5  # topk >= length: dense
    assert inputs.cache["k_index"].shape == (2, 9, 16)
    step = SimpleNamespace(
        **{**vars(inputs), "hidden_states": torch.randn(2, 1, 48), "position_ids": torch.full((2, 1), 9)}
    )
    k2, v2 = torch.cat([k, torch.randn(2, 1, 2, 16)], 1), torch.cat([v, torch.randn(2, 1, 2, 16)], 1)
    assert backend.attention(q[:, :1], k2, v2, step, layer).shape == (2, 1, 8, 16)
    assert inputs.cache["k_index"].shape == (2, 10, 16)
    layer.train()
    aux = {}
    training = SimpleNamespace(**{**vars(inputs), "cache": None, "aux_losses": aux})
    backend.attention(q, k, v, training, layer)
    assert aux["indexer_kl"].requires_grad
    default = factory(
        SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=None)
    )
    assert (default.num_heads, default.index_dim, default.topk) == (4, 128, 2048)
    with pytest.raises(TypeError, match="sa_indexer"):
        backend.attention(q, k, v, inputs, None)


def test_cache_appends_in_place_and_keeps_gradients():
    """Decode steps write their rows into a growing buffer (no copy of the cache per token) and read back
    exactly what concatenation gives; under autograd the new rows keep their graph."""
    state = {}
    rows = [torch.randn(2, n, 3) for n in (300, 1, 1, 40, 1)]
    for i, x in enumerate(rows):
        with torch.no_grad():
            got = append_rows(state, "k", x)
        assert torch.equal(got, torch.cat(rows[: i + 1], 1)) and got is state["k"]
        if i == 1:
            buffer = state["k_buffer"]
    assert state["k_buffer"] is buffer and buffer.shape[1] == 556  # one growth: 300 + 256 rows
    reserved = {}
    append_rows(reserved, "v", rows[0], capacity=1000)
    assert reserved["v_buffer"].shape[1] == 1000
    leaf = torch.randn(2, 2, 3, requires_grad=True)
    out = append_rows(state, "k", leaf * 2)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, 2.0)) and torch.equal(state["k"][:, -2:], leaf * 2)
    saved = append_rows(state, "k", torch.randn(2, 1, 3))  # grad mode: not a view later appends write
    assert saved.data_ptr() != state["k_buffer"].data_ptr() and torch.equal(saved, state["k"])
    with pytest.raises(ValueError, match="cannot append k"):
        append_rows(state, "k", torch.randn(3, 1, 3))


def test_dsa_cache_capacity_reserves_every_layer_buffer(force_impl):
    force_impl("reference")
    attn = _layer(topk=4, seed=5).eval()
    x = torch.randn(2, 9, 48)
    cache = DSACache(capacity=12)
    out = torch.cat(
        [attn(x[:, :6], cache=cache)] + [attn(x[:, i : i + 1], cache=cache) for i in range(6, 9)], 1
    )
    state = cache.layer(0)
    assert all(state[f"{n}_buffer"].shape[1] == 12 for n in ("k", "v", "k_index"))
    assert rel_err(out, attn(x)) < 1e-5
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        DSACache(capacity=-1)
