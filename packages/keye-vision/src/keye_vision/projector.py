"""Keye-VL-1.5 projector: 2x2 spatial merge -> LayerNorm(4 * hidden) -> Linear -> GELU -> Linear.

The merge takes the row-major patches of each frame and groups each 2x2 neighbourhood as
[top-left, top-right, bottom-left, bottom-right]; checkpoint names ``mlp_AR.{pre_norm,linear_1,linear_2}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .packing import check_grid_thw


def merge_index(
    grid_thw: torch.Tensor, merge: int = 2, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[total_patches]`` permutation that puts each ``merge x merge`` block's patches next to each other."""
    grid_thw = check_grid_thw(grid_thw)
    parts, start = [], 0
    for t, h, w in grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(
                f"grid {(t, h, w)} cannot be merged {merge}x{merge}: h and w must be multiples of {merge}"
            )
        idx = torch.arange(t * h * w, device=device).reshape(t, h // merge, merge, w // merge, merge)
        parts.append(idx.permute(0, 1, 3, 2, 4).reshape(-1) + start)
        start += t * h * w
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


class Projector(nn.Module):
    """Vision features ``[total_patches, vision_hidden]`` -> ``[total_patches / 4, text_hidden]``."""

    def __init__(self, vision_hidden: int, text_hidden: int, merge_size: int = 2) -> None:
        super().__init__()
        self.merge_size = merge_size
        merged = vision_hidden * merge_size**2
        self.pre_norm = nn.LayerNorm(merged, eps=1e-5)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, text_hidden)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        index = merge_index(grid_thw, self.merge_size, features.device)
        if index.numel() != features.shape[0]:
            raise ValueError(
                f"grid_thw describes {index.numel()} patches but features has {features.shape[0]}"
            )
        x = features.index_select(0, index).reshape(-1, self.pre_norm.normalized_shape[0])
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        prefix: str = "mlp_AR.",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Projector:
        """Build from a Keye checkpoint folder: widths from ``config.json``, weights by ``prefix``."""
        from .weights import load_prefixed, read_config

        cfg = read_config(path)
        vision = cfg.get("vision_config", {})
        try:
            text_hidden = cfg.get("text_config", {}).get("hidden_size", cfg["hidden_size"])
            vision_hidden, merge = vision["hidden_size"], vision.get("spatial_merge_size", 2)
        except KeyError as err:
            raise ValueError(
                f"{path}/config.json lacks {err} (need hidden_size and vision_config.hidden_size)"
            ) from None
        with torch.device("meta"):
            model = cls(vision_hidden, text_hidden, merge)
        model = model.to_empty(device=device or "cpu")
        load_prefixed(model, path, prefix).raise_if_incomplete()
        return model.to(dtype=dtype) if dtype is not None else model
