from __future__ import annotations

import time

import pytest

from keye_moe import DecoderConfig, build_on_meta, count_parameters


def test_presets_match_design_numbers():
    q = DecoderConfig.preset("qwen3-30b-a3b")
    assert (q.num_hidden_layers, q.hidden_size, q.num_attention_heads, q.num_key_value_heads) == (
        48,
        2048,
        32,
        4,
    )
    assert (q.head_dim, q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size) == (128, 128, 8, 768)
    assert (q.vocab_size, q.rms_norm_eps, q.tie_word_embeddings) == (151936, 1e-6, False)
    k = DecoderConfig.preset("keye-vl-2.0-30b-a3b")
    assert k.sa_config == {"indexer_num_heads": 4, "indexer_head_dim": 128, "topk": 2048}
    assert k.mrope_section == [16, 24, 24] and k.max_position_embeddings == 262144


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "keye-vl-2.0-30b-a3b"])
def test_30b_presets_build_on_meta_fast_with_the_published_counts(name):
    start = time.perf_counter()
    model = build_on_meta(DecoderConfig.preset(name))
    assert time.perf_counter() - start < 30
    assert all(p.is_meta for p in model.parameters())
    total, active = count_parameters(model.config)
    assert abs(total - 30.5e9) / 30.5e9 < 0.01
    if name == "qwen3-30b-a3b":
        assert abs(active - 3.3e9) / 3.3e9 < 0.03
    else:  # the decoder's 3.35B plus 48 DSA indexers (1.32M each), which run for every token
        base_total, base_active = count_parameters(DecoderConfig.preset("qwen3-30b-a3b"))
        indexer = 48 * (2048 * (4 * 128 + 4) + 2048 * 128 + 3 * 128)
        assert (total, active) == (base_total + indexer, base_active + indexer)
    if model.model.layers[0].self_attn.backend_module_name or model.config.sa_config is None:
        assert model.num_parameters() == total


def test_count_parameters_equals_built_tiny_models():
    from keye_moe import KeyeMoeForCausalLM

    for overrides in ({}, {"tie_word_embeddings": True}, {"mlp_only_layers": [0]}, {"attention_bias": True}):
        cfg = DecoderConfig.preset("tiny", **overrides)
        assert KeyeMoeForCausalLM(cfg).num_parameters() == count_parameters(cfg)[0], overrides


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"mrope_section": [4, 2, 1]}, "must sum to head_dim // 2"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_only_layers": [5]}, "mlp_only_layers"),
        ({"sa_config": {"topk": 0}}, "sa_config['topk']"),
        ({"attn_implementation": "dsa"}, "needs sa_config"),
    ],
)
def test_bad_configs_fail_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DecoderConfig.preset("tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="tiny"):
        DecoderConfig.preset("huge")
    with pytest.raises(TypeError, match="no field"):
        DecoderConfig.preset("tiny").replace(hidden=3)


def test_hf_config_round_trip_and_released_layouts():
    k = DecoderConfig.preset("keye-vl-2.0-30b-a3b")
    hf = k.to_hf_config()
    assert hf["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert hf["sa_config"]["topk"] == 2048 and hf["num_hidden_layers"] == 48
    assert DecoderConfig.from_hf_config(hf) == k.replace(attn_implementation=None)
    released = {  # the Qwen3-30B-A3B config.json fields that matter, old-style rope_theta
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_hidden_layers": 48,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "vocab_size": 151936,
        "torch_dtype": "bfloat16",
    }
    q = DecoderConfig.from_hf_config(released)
    assert q.rope_theta == 1e6 and q.mrope_section is None and q.num_experts == 128
    v5 = {**released, "num_local_experts": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    v5.pop("num_experts")
    v5.pop("rope_theta")
    q5 = DecoderConfig.from_hf_config(v5)
    assert (q5.num_experts, q5.rope_theta) == (64, 5e5)
    qwen3_vl = {**released, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20]}}
    assert DecoderConfig.from_hf_config(qwen3_vl).mrope_interleaved
    missing = r"rope_scaling \(yarn\) is missing \['original_max_position_embeddings'\]"
    with pytest.raises(ValueError, match=missing):
        DecoderConfig.from_hf_config({**released, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_scaled_rope_configs_read_write_and_refuse_by_name():
    released = {"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 128, "rope_theta": 1e6,
                "max_position_embeddings": 131072}  # fmt: skip
    # Qwen3's published long-context recipe: YaRN x4 over the 32K pretraining context
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    q = DecoderConfig.from_hf_config({**released, "rope_scaling": yarn})
    assert q.rope_scaling == yarn and q.rope_theta == 1e6
    hf = q.to_hf_config()
    assert hf["rope_scaling"] == yarn and hf["rope_parameters"] == {**yarn, "rope_theta": 1e6}
    assert DecoderConfig.from_hf_config(hf) == q
    # transformers v5 form, with M-RoPE and the old "type" key; yarn's factor defaults to max / original
    v5_rope = {"type": "yarn", "rope_theta": 5e5, "original_max_position_embeddings": 32768,
               "mrope_section": [16, 24, 24], "beta_fast": 16}  # fmt: skip
    v5 = {**released, "rope_parameters": v5_rope}
    k = DecoderConfig.from_hf_config(v5)
    assert k.rope_scaling == {"rope_type": "yarn", "beta_fast": 16, "factor": 4.0,
                              "original_max_position_embeddings": 32768}  # fmt: skip
    assert k.mrope_section == [16, 24, 24] and DecoderConfig.from_hf_config(k.to_hf_config()) == k
    linear = DecoderConfig(rope_scaling={"type": "linear", "factor": 2})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2}
    for scaling, message in [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type must be one of"),
        ({"rope_type": "linear"}, r"missing \['factor'\]"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, r"unknown keys \['beta_fast'\]"),
        ({"rope_type": "linear", "factor": -1.0}, r"rope_scaling\['factor'\] must be a positive number"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "truncate": 1}, "bool"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8}, "high_freq_factor > low_freq_factor"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DecoderConfig(rope_scaling=scaling)
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        DecoderConfig.from_hf_config({**released, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        partial = {"rope_type": "default", "partial_rotary_factor": 0.5}
        DecoderConfig.from_hf_config({**released, "rope_parameters": partial})
