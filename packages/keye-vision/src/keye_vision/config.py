"""VisionConfig: the released Keye ``vision_config`` fields plus the ``use_rope`` switch (DESIGN §6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

_ACTIVATIONS = {"gelu_pytorch_tanh", "gelu", "gelu_new", "quick_gelu"}

_PRESETS: dict[str, dict[str, Any]] = {
    # SigLIP so400m-patch14-384 as used by Keye-VL-1.5: a 27 x 27 position table.
    "siglip-so400m": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
    # CPU tests and the demo: head_dim 16 (divisible by 4, as 2-D RoPE needs), a 4 x 4 table.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    ),
}


@dataclass
class VisionConfig:
    """Shape of the ViT. Field names follow the released checkpoint's ``vision_config``."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    use_rope: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4; got head_dim {self.head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}; got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table (27 for so400m at 384 px)."""
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VisionConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        """From a released ``vision_config`` dict; keys this ViT does not use are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
