"""KeyeVLConfig: presets, the released config.json layout both ways, validation."""

import pytest

from keye_train.config import KeyeVLConfig
from keye_train.tokenizer import KeyeTokenizer


@pytest.mark.parametrize("name", ["tiny", "keye-vl-2.0-30b-a3b"])
def test_round_trip_through_config_json(name):
    config = KeyeVLConfig.preset(name)
    hf = config.to_hf_config()
    # the released layout: text fields flat, vision nested, M-RoPE sections and sa_config present
    assert hf["hidden_size"] == config.text_config.hidden_size and "text_config" not in hf
    assert hf["vision_config"]["hidden_size"] == config.vision_config.hidden_size
    assert hf["rope_scaling"]["mrope_section"] == config.text_config.mrope_section
    assert set(hf["sa_config"]) == {"indexer_num_heads", "indexer_head_dim", "topk"}
    assert {hf["image_token_id"], hf["video_token_id"]} == {config.image_token_id, config.video_token_id}
    assert KeyeVLConfig.from_hf_config(hf) == config


def test_released_style_config_is_read():
    hf = KeyeVLConfig.preset("keye-vl-2.0-30b-a3b").to_hf_config()
    hf.pop("vision_encoder"), hf.pop("decoder"), hf.pop("rope_parameters")
    hf.update(torch_dtype="bfloat16", auto_map={"AutoModel": "modeling_keye.Keye"})
    config = KeyeVLConfig.from_hf_config(hf)
    assert config.text_config.mrope_section == [16, 24, 24]
    assert config.text_config.num_experts == 128 and config.vision_config.num_hidden_layers == 27
    assert config.image_token_id == 151655 and config.video_token_id == 151656
    assert config.extra["auto_map"] == {"AutoModel": "modeling_keye.Keye"}  # kept for the next save
    assert config.to_hf_config()["torch_dtype"] == "bfloat16"


def test_tiny_matches_the_embedded_tokenizer():
    config = KeyeVLConfig.preset("tiny")
    tok = KeyeTokenizer.default()
    assert config.text_config.vocab_size == len(tok)
    assert config.image_token_id == tok.ids.image_pad and config.video_token_id == tok.ids.video_pad
    assert config.text_config.eos_token_id == tok.ids.im_end


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown KeyeVLConfig preset 'huge'"):
        KeyeVLConfig.preset("huge")
    with pytest.raises(ValueError, match="image_token_id must be a token id in"):
        KeyeVLConfig.preset("tiny", image_token_id=99999)
    with pytest.raises(ValueError, match="must differ"):
        KeyeVLConfig.preset("tiny", video_token_id=KeyeVLConfig.preset("tiny").image_token_id)
    with pytest.raises(ValueError, match="no 'vision_config'"):
        KeyeVLConfig.from_hf_config({"hidden_size": 8})


def test_nested_overrides_as_in_yaml():
    config = KeyeVLConfig.preset(
        "tiny", text_config={"num_hidden_layers": 3}, vision_config={"num_hidden_layers": 1}
    )
    assert config.text_config.num_hidden_layers == 3 and config.vision_config.num_hidden_layers == 1
    assert config.text_config.hidden_size == KeyeVLConfig.preset("tiny").text_config.hidden_size
    with pytest.raises(TypeError, match=r"no field\(s\) \['layers'\]"):
        KeyeVLConfig.preset("tiny", layers=3)
    with pytest.raises(TypeError, match="DecoderConfig has no field"):
        KeyeVLConfig.preset("tiny", text_config={"nonsense": 1})
