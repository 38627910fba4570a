"""DecoderConfig: the decoder's hyper-parameters, presets, validation and the Hugging Face config.json form.

Field names follow the released Qwen3-MoE / Keye-VL ``config.json`` (flat text fields), so a config
round-trips through ``from_hf_config`` / ``to_hf_config`` without a translation table for the common
fields. Everything is validated at construction so a bad value fails here, naming the field, rather than
as a shape error deep inside a forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from keye_moe.layers.rope import ROPE_SCALING_KEYS

SA_CONFIG_DEFAULTS = {"indexer_num_heads": 4, "indexer_head_dim": 128, "topk": 2048}


@dataclass
class DecoderConfig:
    """Hyper-parameters of a Qwen3-MoE-style decoder (DESIGN §5)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense SwiGLU width, used only by layers listed in mlp_only_layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] | None = None  # [t, h, w] frequency counts summing to head_dim // 2
    mrope_interleaved: bool = False  # Qwen3-VL interleaving; False is the Qwen2-VL / Keye-VL-1.5 layout
    rope_scaling: dict[str, Any] | None = None  # context extension: {"rope_type": linear|llama3|yarn, ...}
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias added for selection only
    expert_bias_update_rate: float = 1e-3
    sa_config: dict[str, Any] | None = None  # DSA indexer: indexer_num_heads, indexer_head_dim, topk
    attn_implementation: str | None = None  # None: "dsa" when sa_config is set and keye-dsa is installed
    expert_implementation: str = "auto"  # "auto": grouped_mm on Hopper-class CUDA, else "loop"
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    def __post_init__(self) -> None:
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.mrope_section is not None:
            self.mrope_section = [int(s) for s in self.mrope_section]
        if self.sa_config is not None:
            self.sa_config = {**SA_CONFIG_DEFAULTS, **dict(self.sa_config)}
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer; got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "decoder_sparse_step",
        ):
            positive(name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DecoderConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even for RoPE; got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(
                f"DecoderConfig.hidden_act must be 'silu' (SwiGLU experts); got {self.hidden_act!r}"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"DecoderConfig.rms_norm_eps and rope_theta must be positive; got {self.rms_norm_eps}, "
                f"{self.rope_theta}"
            )
        if self.num_experts < 0:
            raise ValueError(f"DecoderConfig.num_experts must be >= 0; got {self.num_experts}")
        if self.num_experts > 0:
            positive("moe_intermediate_size")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"DecoderConfig.num_experts_per_tok must be in [1, num_experts={self.num_experts}]; "
                    f"got {self.num_experts_per_tok}"
                )
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            positive("intermediate_size")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"DecoderConfig.mlp_only_layers holds {bad}, outside [0, {self.num_hidden_layers})"
            )
        if self.mrope_section is not None:
            if len(self.mrope_section) != 3 or any(s < 0 for s in self.mrope_section):
                raise ValueError(
                    f"DecoderConfig.mrope_section must be three non-negative counts [t, h, w]; "
                    f"got {self.mrope_section}"
                )
            if sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(
                    f"DecoderConfig.mrope_section {self.mrope_section} must sum to head_dim // 2 = "
                    f"{self.head_dim // 2}"
                )
            if self.mrope_interleaved and max(self.mrope_section[1:]) * 3 > self.head_dim // 2 + 2:
                raise ValueError(
                    f"DecoderConfig.mrope_section {self.mrope_section} is too wide for interleaved M-RoPE "
                    f"over {self.head_dim // 2} frequencies"
                )
        if self.sa_config is not None:
            for key in SA_CONFIG_DEFAULTS:
                value = self.sa_config[key]
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(
                        f"DecoderConfig.sa_config[{key!r}] must be a positive integer; got {value!r}"
                    )
        if self.attn_implementation is not None and not isinstance(self.attn_implementation, str):
            raise ValueError(
                f"DecoderConfig.attn_implementation must be a backend name or None; got "
                f"{self.attn_implementation!r}"
            )
        if self.attn_implementation == "dsa" and self.sa_config is None:
            raise ValueError(
                "DecoderConfig.attn_implementation='dsa' needs sa_config (the indexer's settings)"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The Qwen3-MoE rule: routed experts unless listed in mlp_only_layers or off the sparse step."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def replace(self, **changes: Any) -> DecoderConfig:
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"DecoderConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(copy.deepcopy(self), **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecoderConfig:
        """``tiny``, ``qwen3-30b-a3b`` or ``keye-vl-2.0-30b-a3b``, optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(
                f"unknown DecoderConfig preset {name!r}; available: {', '.join(sorted(PRESETS))}"
            )
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> DecoderConfig:
        """Read a Hugging Face / Keye-VL ``config.json`` dict (text fields flat, or under ``text_config``).

        Unknown keys (vision settings, token ids of the VLM, ...) are ignored. RoPE may be default or
        M-RoPE, either scaled by ``linear``, ``llama3`` or ``yarn`` (``rope_scaling``); any other
        ``rope_type`` (dynamic, longrope, ...) is refused by name.
        """
        if not isinstance(hf, dict):
            raise TypeError(f"from_hf_config expects the parsed config.json dict; got {type(hf).__name__}")
        src = dict(hf.get("text_config") or hf)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in src.items() if k in names and k != "rope_scaling"}  # read below
        if "num_local_experts" in src and "num_experts" not in src:
            kwargs["num_experts"] = src["num_local_experts"]
        if kwargs.get("head_dim") is None and "hidden_size" in src and "num_attention_heads" in src:
            kwargs["head_dim"] = src["hidden_size"] // src["num_attention_heads"]
        rope = {**(src.get("rope_scaling") or {}), **(src.get("rope_parameters") or {})}
        if "rope_theta" in rope and "rope_theta" not in src:
            kwargs["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope", None, *ROPE_SCALING_KEYS):
            raise ValueError(
                f"config.json rope_type {rope_type!r} is not supported (default RoPE / M-RoPE, or "
                f"scaled by one of {sorted(ROPE_SCALING_KEYS)})"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(
                f"config.json partial_rotary_factor {rope['partial_rotary_factor']} is not supported "
                "(RoPE rotates the whole head_dim)"
            )
        if rope_type in ROPE_SCALING_KEYS:
            required, optional = ROPE_SCALING_KEYS[rope_type]
            kwargs["rope_scaling"] = {
                "rope_type": rope_type,
                **{k: rope[k] for k in sorted(required | optional) if rope.get(k) is not None},
            }
        if rope.get("mrope_section") is not None:
            kwargs["mrope_section"] = list(rope["mrope_section"])
            kwargs["mrope_interleaved"] = bool(rope.get("mrope_interleaved", False))
        if src.get("sa_config") is None and hf.get("sa_config") is not None:
            kwargs["sa_config"] = hf["sa_config"]
        if kwargs.get("mlp_only_layers") is None:
            kwargs.pop("mlp_only_layers", None)
        kwargs.pop("attn_implementation", None)  # a runtime choice, not a property of the weights
        kwargs.pop("expert_implementation", None)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict: Qwen3-MoE field names (loadable by transformers) plus ``sa_config``."""
        out: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
        }
        rope_fields = {"mrope_section", "mrope_interleaved", "rope_scaling"}  # written under rope_parameters
        skip = rope_fields | {"attn_implementation", "expert_implementation"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        if self.sa_config is None:
            out.pop("sa_config")
        if not self.expert_bias:
            out.pop("expert_bias")
            out.pop("expert_bias_update_rate")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope.update(copy.deepcopy(self.rope_scaling or {}))
        if self.mrope_section is not None:
            rope["mrope_section"] = list(self.mrope_section)
            if self.mrope_interleaved:
                rope["mrope_interleaved"] = True
        if self.mrope_section is not None or self.rope_scaling is not None:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        out["rope_parameters"] = rope
        return out


def _normalize_rope_scaling(scaling: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """A checked copy of ``rope_scaling``: a known ``rope_type`` (``type`` accepted), its required keys,
    no unknown ones, positive numbers (yarn's missing ``factor`` is max / original positions, as in
    transformers)."""
    if not isinstance(scaling, dict):
        raise ValueError(f"DecoderConfig.rope_scaling must be a dict or None; got {scaling!r}")
    out = dict(scaling)
    kind = out.pop("rope_type", out.pop("type", None))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"DecoderConfig.rope_scaling rope_type must be one of {sorted(ROPE_SCALING_KEYS)}; got {kind!r}"
        )
    required, optional = ROPE_SCALING_KEYS[kind]
    if kind == "yarn" and out.get("factor") is None and "original_max_position_embeddings" in out:
        out["factor"] = max_position_embeddings / out["original_max_position_embeddings"]
    out = {k: v for k, v in out.items() if v is not None}
    missing, unknown = required - set(out), set(out) - required - optional
    if missing or unknown:
        raise ValueError(
            f"DecoderConfig.rope_scaling ({kind}) is missing {sorted(missing)} / has unknown keys "
            f"{sorted(unknown)}; it takes {sorted(required)} and optionally {sorted(optional)}"
        )
    for key, value in out.items():
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"DecoderConfig.rope_scaling['truncate'] must be a bool; got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"DecoderConfig.rope_scaling[{key!r}] must be a positive number; got {value!r}")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(
            "DecoderConfig.rope_scaling (llama3) needs high_freq_factor > low_freq_factor; got "
            f"{out['high_freq_factor']} and {out['low_freq_factor']}"
        )
    return {"rope_type": kind, **out}


_QWEN3_30B_A3B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "keye-vl-2.0-30b-a3b": {
        **_QWEN3_30B_A3B,
        "max_position_embeddings": 262144,
        "mrope_section": [16, 24, 24],
        "sa_config": dict(SA_CONFIG_DEFAULTS),
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
}


def count_parameters(config: DecoderConfig) -> tuple[int, int]:
    """(total, active) parameter counts from the config alone; active counts top-k experts per token.

    Embeddings and the LM head count as active (as Qwen reports "3.3B activated"); the DSA indexer counts
    when ``sa_config`` is set.
    """
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = h * d * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) + 2 * d
    if c.attention_bias:
        attn += d * (c.num_attention_heads + 2 * c.num_key_value_heads) + h
    if c.sa_config is not None:
        hi, di = c.sa_config["indexer_num_heads"], c.sa_config["indexer_head_dim"]
        attn += h * (hi * di + hi) + h * di + 3 * di
    norms = 2 * h
    total = active = 0
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            expert = 3 * h * c.moe_intermediate_size
            total += attn + norms + h * c.num_experts + c.num_experts * expert
            active += attn + norms + h * c.num_experts + c.num_experts_per_tok * expert
        else:
            mlp = 3 * h * c.intermediate_size
            total += attn + norms + mlp
            active += attn + norms + mlp
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
    return total + embed, active + embed
