"""Composite checkpoints: released names and shapes, save/reload equality, and every failure named."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keye_moe.checkpoint import INDEX_NAME, CheckpointError
from keye_train.config import KeyeVLConfig
from keye_train.modeling import KeyeVLForConditionalGeneration
from keye_train.processor import KeyeProcessor


def frames(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]


MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": frames(1, 84, 112, 0)[0]},
            {
                "type": "video",
                "video": frames(3, 56, 56, 1),
                "timestamps": [0.0, 0.5, 1.0],
                "frame_types": ["slow", "fast", "slow"],
            },
            {"type": "text", "text": "What happens?"},
        ],
    },
    {"role": "assistant", "content": "A square moves."},
]


@pytest.fixture(scope="module")
def processor():
    return KeyeProcessor()


@pytest.fixture(scope="module")
def batch(processor):
    return processor([MESSAGES, MESSAGES[:1]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor):
    torch.manual_seed(0)
    model = KeyeVLForConditionalGeneration(KeyeVLConfig.preset("tiny")).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, processor=processor, max_shard_size="300KB")
    return model, path


def tensors_of(path):
    index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for name, shard in index.items():
        with safe_open(str(path / shard), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def rewrite(src, dst, change):
    """Copy a checkpoint as one model.safetensors after ``change(tensors)``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = tensors_of(src)
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def expected_names(config):
    v, t = config.vision_config, config.text_config
    names = {f"visual.vision_model.embeddings.patch_embedding.{p}" for p in ("weight", "bias")}
    names |= {"visual.vision_model.embeddings.position_embedding.weight"}
    names |= {f"visual.vision_model.post_layernorm.{p}" for p in ("weight", "bias")}
    for n in range(v.num_hidden_layers):
        pre = f"visual.vision_model.encoder.layers.{n}."
        mods = ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
        mods += [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names |= {f"{pre}{m}.{p}" for m in mods for p in ("weight", "bias")}
    names |= {f"mlp_AR.{m}.{p}" for m in ("pre_norm", "linear_1", "linear_2") for p in ("weight", "bias")}
    names |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(t.num_hidden_layers):
        pre = f"model.layers.{n}."
        names |= {f"{pre}self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"{pre}self_attn.{p}_norm.weight" for p in "qk"}
        names |= {f"{pre}{p}.weight" for p in ("input_layernorm", "post_attention_layernorm", "mlp.gate")}
        experts = [(e, p) for e in range(t.num_experts) for p in ("gate", "up", "down")]
        names |= {f"{pre}mlp.experts.{e}.{p}_proj.weight" for e, p in experts}
        indexer = ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight", "k_norm.bias")
        names |= {f"{pre}self_attn.sa_indexer.{p}" for p in indexer}
    return names


def test_saved_names_and_shapes_are_the_released_ones(saved):
    model, path = saved
    tensors = tensors_of(path)
    config = model.config
    assert set(tensors) == expected_names(config)
    assert len({f for f in json.loads((path / INDEX_NAME).read_text())["weight_map"].values()}) > 1  # sharded
    v, t, sa = config.vision_config, config.text_config, config.text_config.sa_config
    h, i = t.hidden_size, t.moe_intermediate_size
    shapes = {
        "visual.vision_model.embeddings.patch_embedding.weight": (v.hidden_size, 3, 14, 14),
        "visual.vision_model.embeddings.position_embedding.weight": (
            (v.image_size // 14) ** 2,
            v.hidden_size,
        ),
        "mlp_AR.linear_1.weight": (4 * v.hidden_size, 4 * v.hidden_size),
        "mlp_AR.linear_2.weight": (h, 4 * v.hidden_size),
        "model.layers.1.mlp.experts.3.gate_proj.weight": (i, h),
        "model.layers.1.mlp.experts.3.down_proj.weight": (h, i),
        "model.layers.0.mlp.gate.weight": (t.num_experts, h),
        "model.layers.0.self_attn.sa_indexer.q_proj.weight": (
            sa["indexer_num_heads"] * sa["indexer_head_dim"] + sa["indexer_num_heads"],
            h,
        ),
        "model.layers.0.self_attn.sa_indexer.k_proj.weight": (sa["indexer_head_dim"], h),
        "lm_head.weight": (t.vocab_size, h),
    }
    for name, shape in shapes.items():
        assert tuple(tensors[name].shape) == shape, name
    hf = json.loads((path / "config.json").read_text())
    assert KeyeVLConfig.from_hf_config(hf).to_hf_config()["vision_config"] == hf["vision_config"]
    assert (path / "tokenizer.json").is_file() and (path / "processor_config.json").is_file()


def test_reload_gives_identical_logits(saved, batch):
    model, path = saved
    again = KeyeVLForConditionalGeneration.from_pretrained(path)
    report = again.load_report
    assert not report.missing and not report.unexpected and not report.fresh_indexers
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    processor = KeyeProcessor.from_pretrained(path)
    assert processor.tokenizer.ids == KeyeProcessor().tokenizer.ids


def test_fused_expert_form_and_bf16_load(saved, batch, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path, expert_format="fused")
    names = set(json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    again = KeyeVLForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    half = KeyeVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_missing_indexers_start_fresh_and_say_so(saved, tmp_path, caplog):
    _, path = saved

    def drop_indexers(tensors):
        for name in [k for k in tensors if ".sa_indexer." in k]:
            del tensors[name]

    ckpt = rewrite(path, tmp_path / "no_indexer", drop_indexers)
    with caplog.at_level(logging.WARNING):
        model = KeyeVLForConditionalGeneration.from_pretrained(ckpt)
    assert model.load_report.fresh_indexers
    assert "no sa_indexer weights" in caplog.text and "start fresh" in caplog.text
    indexer = model.model.layers[0].self_attn.sa_indexer
    assert all(torch.isfinite(p).all() for p in indexer.parameters())
    assert torch.equal(indexer.k_norm.weight, torch.ones_like(indexer.k_norm.weight))  # a real init
    # a checkpoint from before DSA: add indexers of another width through config_overrides
    wider = {"text_config": {"sa_config": {"indexer_num_heads": 4, "indexer_head_dim": 8, "topk": 32}}}
    grown = KeyeVLForConditionalGeneration.from_pretrained(ckpt, config_overrides=wider)
    assert grown.load_report.fresh_indexers
    assert grown.model.layers[1].self_attn.sa_indexer.k_proj.weight.shape[0] == 8


def test_dense_attention_load_ignores_indexers(saved, batch):
    model, path = saved
    dense = KeyeVLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    assert dense.model.layers[0].self_attn.backend_module_name is None
    assert len(dense.load_report.ignored) == 5 * model.config.text_config.num_hidden_layers
    assert all(".sa_indexer." in name for name in dense.load_report.ignored)
    real = batch["attention_mask"].bool()  # (padding queries attend to nothing; their outputs differ)
    with torch.no_grad():  # prompts shorter than top-k: DSA is exactly dense attention
        assert torch.allclose(model(**batch).logits[real], dense(**batch).logits[real], atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.pop("model.norm.weight"), r"missing 1 tensor\(s\): model.norm.weight"),
        (
            lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"),
            "model.layers.1.mlp.experts.2.up_proj",
        ),
        (
            lambda t: t.pop("visual.vision_model.post_layernorm.bias"),
            "visual.vision_model.post_layernorm.bias",
        ),
        (
            lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}),
            "unexpected 1 tensor.*layers.9.extra",
        ),
        (
            lambda t: t.update({"mlp_AR.linear_2.bias": torch.zeros(3)}),
            r"mlp_AR.linear_2.bias: checkpoint \[3\]",
        ),
    ],
    ids=["missing", "missing-expert", "missing-vision", "unexpected", "misshaped"],
)
def test_bad_checkpoints_name_the_tensor(saved, tmp_path, change, match):
    _, path = saved
    ckpt = rewrite(path, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=match):
        KeyeVLForConditionalGeneration.from_pretrained(ckpt)


def test_siglip_head_is_ignored_and_non_strict_reports(saved, tmp_path):
    _, path = saved

    def change(tensors):
        tensors["visual.vision_model.head.probe"] = torch.zeros(1, 1, 8)
        del tensors["model.norm.weight"]

    ckpt = rewrite(path, tmp_path / "loose", change)
    model = KeyeVLForConditionalGeneration.from_pretrained(ckpt, strict=False)
    assert model.load_report.ignored == ["visual.vision_model.head.probe"]
    assert model.load_report.missing == ["model.norm.weight"]
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        KeyeVLForConditionalGeneration.from_pretrained(tmp_path)
