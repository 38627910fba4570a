"""KeyeVLConfig: the composed model's settings, in the released Keye-VL ``config.json`` layout.

The text decoder's fields sit flat at the top level (``keye_moe.DecoderConfig`` reads and writes them,
with ``rope_scaling.mrope_section`` and ``sa_config``), the vision tower's under ``vision_config``
(``keye_vision.VisionConfig``), plus the ids of the image and video pad tokens. Which registered
components build the tower and the decoder is recorded too (``keye-vit`` and ``keye-moe`` by default),
so a third-party plugin can supply either.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from keye_train.tokenizer import DEFAULT_VOCAB_SIZE, default_special_id

QWEN3_IMAGE_PAD, QWEN3_VIDEO_PAD, QWEN3_VISION_START = 151655, 151656, 151652


def _decoder_config_cls():
    from keye_moe.config import DecoderConfig

    return DecoderConfig


def _vision_config_cls():
    from keye_vision import VisionConfig

    return VisionConfig


def _tiny() -> dict[str, Any]:
    decoder = _decoder_config_cls().preset(
        "tiny",
        vocab_size=DEFAULT_VOCAB_SIZE,  # the embedded tokenizer
        mrope_section=[2, 3, 3],  # head_dim 16: 8 frequencies split t/h/w as Keye's 16/24/24 of 64
        sa_config={"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 64},
        bos_token_id=default_special_id("<|endoftext|>"),
        eos_token_id=default_special_id("<|im_end|>"),
        pad_token_id=default_special_id("<|endoftext|>"),
    )
    return {
        "text_config": decoder,
        "vision_config": _vision_config_cls().preset("tiny"),
        "image_token_id": default_special_id("<|image_pad|>"),
        "video_token_id": default_special_id("<|video_pad|>"),
        "vision_start_token_id": default_special_id("<|vision_start|>"),
    }


def _keye_vl_2() -> dict[str, Any]:
    return {
        "text_config": _decoder_config_cls().preset("keye-vl-2.0-30b-a3b"),
        "vision_config": _vision_config_cls().preset("siglip-so400m"),
        "image_token_id": QWEN3_IMAGE_PAD,
        "video_token_id": QWEN3_VIDEO_PAD,
        "vision_start_token_id": QWEN3_VISION_START,
    }


PRESETS = {"tiny": _tiny, "keye-vl-2.0-30b-a3b": _keye_vl_2}


@dataclass
class KeyeVLConfig:
    """Decoder + vision tower + the token ids that tie them together."""

    text_config: Any  # keye_moe.DecoderConfig
    vision_config: Any  # keye_vision.VisionConfig
    image_token_id: int = QWEN3_IMAGE_PAD
    video_token_id: int = QWEN3_VIDEO_PAD
    vision_start_token_id: int = QWEN3_VISION_START
    vision_encoder: str = "keye-vit"  # keye_vision_encoders registry name
    decoder: str = "keye-moe"  # keye_decoders registry name
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept on save

    def __post_init__(self) -> None:
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise ValueError(f"KeyeVLConfig.{name} must be a token id in [0, {vocab}); got {value!r}")
        if self.image_token_id == self.video_token_id:
            raise ValueError(f"image_token_id and video_token_id must differ; both are {self.image_token_id}")
        merge = self.vision_config.spatial_merge_size
        if merge != 2:
            raise ValueError(
                f"vision_config.spatial_merge_size must be 2 (the projector's 2x2 merge); got {merge}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> KeyeVLConfig:
        """``tiny`` (CPU tests, the demo; matches the embedded tokenizer) or ``keye-vl-2.0-30b-a3b``;
        ``overrides`` as in ``replace``."""
        if name not in PRESETS:
            raise ValueError(f"unknown KeyeVLConfig preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name]()).replace(**overrides)

    def replace(self, **changes: Any) -> KeyeVLConfig:
        """A validated copy with fields changed. ``text_config`` and ``vision_config`` may be given as
        dicts of the fields to change (``{"num_hidden_layers": 4}``), which suits YAML configs."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"KeyeVLConfig has no field(s) {sorted(unknown)}")
        changes = dict(changes)
        if isinstance(changes.get("text_config"), dict):
            changes["text_config"] = self.text_config.replace(**changes["text_config"])
        if isinstance(changes.get("vision_config"), dict):
            vision = {**self.vision_config.to_dict(), **changes["vision_config"]}
            changes["vision_config"] = type(self.vision_config)(**vision)
        return dataclasses.replace(copy.deepcopy(self), **changes)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> KeyeVLConfig:
        """Read a released Keye-VL ``config.json`` dict."""
        if not isinstance(hf, dict):
            raise TypeError(f"from_hf_config expects the parsed config.json dict; got {type(hf).__name__}")
        if not isinstance(hf.get("vision_config"), dict):
            raise ValueError("config.json has no 'vision_config' object; is this a Keye-VL checkpoint?")
        text = _decoder_config_cls().from_hf_config(hf)
        vision = _vision_config_cls().from_dict(hf["vision_config"])
        known = set(text.to_hf_config()) | {f.name for f in dataclasses.fields(cls)} | {"rope_scaling"}
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(
            text_config=text,
            vision_config=vision,
            image_token_id=int(hf.get("image_token_id", QWEN3_IMAGE_PAD)),
            video_token_id=int(hf.get("video_token_id", QWEN3_VIDEO_PAD)),
            vision_start_token_id=int(hf.get("vision_start_token_id", QWEN3_VISION_START)),
            vision_encoder=hf.get("vision_encoder", "keye-vit"),
            decoder=hf.get("decoder", "keye-moe"),
            extra=extra,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict: flat text fields, ``vision_config``, ``sa_config``, token ids."""
        out = {**copy.deepcopy(self.extra), **self.text_config.to_hf_config()}
        out.update(
            architectures=["KeyeVLForConditionalGeneration"],
            model_type="keye_vl",
            vision_config=self.vision_config.to_dict(),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_encoder=self.vision_encoder,
            decoder=self.decoder,
        )
        return out
