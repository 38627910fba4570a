"""KeyeViT: the SigLIP-style native-resolution vision tower of Keye-VL (DESIGN §6).

Parameter names are the released ``visual.vision_model.*`` names without that prefix, so SigLIP and
Keye checkpoints load unchanged. Input is one packed sequence of patches; attention runs inside each
image or frame only (``cu_seqlens``), so nothing is padded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .config import VisionConfig
from .packing import PackedGrid, pack_grid
from .rope import apply_rope, rope_cos_sin

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class VisionEmbeddings(nn.Module):
    """Patch projection (a conv with stride = kernel, run as one matmul on packed patches) plus the
    learned position table bilinearly resized to each frame's grid."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c, p, d = config.num_channels, config.patch_size, config.hidden_size
        self.patch_embedding = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(config.position_grid**2, d)

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """``[height * width, hidden]``: the table resized like ``F.interpolate(bilinear)``."""
        side = self.config.position_grid
        table = self.position_embedding.weight.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (height, width) != (side, side):
            table = F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(height * width, -1)

    def forward(self, pixel_values: torch.Tensor, packed: PackedGrid) -> torch.Tensor:
        weight = self.patch_embedding.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
        # One resized table per distinct frame size, gathered for every patch.
        sizes, size_of_frame = torch.unique(packed.frame_hw, dim=0, return_inverse=True)
        tables, offsets, offset = [], [], 0
        for h, w in sizes.tolist():
            tables.append(self.position_table(h, w))
            offsets.append(offset)
            offset += h * w
        lengths = packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]
        base = torch.tensor(offsets, device=x.device)[size_of_frame].repeat_interleave(
            lengths, output_size=packed.total
        )
        index = base + packed.rows * torch.repeat_interleave(
            packed.frame_hw[:, 1], lengths, output_size=packed.total
        )
        index = index + packed.cols
        return x + torch.cat(tables)[index].to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attend: Attend
    ) -> torch.Tensor:
        shape = (self.num_heads, self.head_dim)
        q, k, v = (proj(x).unflatten(-1, shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.out_proj(attend(q, k, v).flatten(-2))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACT[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm block; works on any leading shape (packed ``[T, D]`` or padded ``[B, L, D]``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attend: Attend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), rope, attend)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class KeyeViT(nn.Module):
    """``forward(pixel_values [total_patches, C*P*P], grid_thw [items, 3]) -> [total_patches, hidden]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def check_inputs(self, pixel_values: torch.Tensor, packed: PackedGrid) -> None:
        c, p = self.config.num_channels, self.config.patch_size
        if pixel_values.dim() != 2 or pixel_values.shape[-1] != c * p * p:
            raise ValueError(f"pixel_values must be [total_patches, {c * p * p}] (C*P*P per patch); "
                             f"got {tuple(pixel_values.shape)}")  # fmt: skip
        if pixel_values.shape[0] != packed.total:
            raise ValueError(f"grid_thw {packed.grid_thw.tolist()} describes {packed.total} patches but "
                             f"pixel_values has {pixel_values.shape[0]}")  # fmt: skip

    def rope(self, packed: PackedGrid) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.config.use_rope:
            return None
        return rope_cos_sin(packed.rows, packed.cols, self.config.head_dim, self.config.rope_theta)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, attn_backend: str = "auto"
    ) -> torch.Tensor:
        packed = pack_grid(grid_thw, pixel_values.device)
        self.check_inputs(pixel_values, packed)
        x = self.embeddings(pixel_values, packed)
        rope = self.rope(packed)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, attn_backend)

        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, attend, use_reentrant=False)
            else:
                x = layer(x, rope, attend)
        return self.post_layernorm(x)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        config: VisionConfig | None = None,
        prefix: str = "visual.vision_model.",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KeyeViT:
        """Build from a Keye checkpoint folder (``config.json`` ``vision_config`` + safetensors)."""
        from .weights import load_prefixed, read_config

        if config is None:
            config = VisionConfig.from_dict(read_config(path).get("vision_config", {}))
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device or "cpu")
        load_prefixed(model, path, prefix).raise_if_incomplete()
        return model.to(dtype=dtype) if dtype is not None else model
