"""Patch n' Pack bookkeeping: from ``grid_thw`` to per-frame ``cu_seqlens`` and per-patch (row, col).

Every frame of every item is its own attention block; patches are row-major inside a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedGrid:
    grid_thw: torch.Tensor  # [num_items, 3] int64
    frame_hw: torch.Tensor  # [num_frames, 2] int64: each frame's patch grid
    cu_seqlens: torch.Tensor  # [num_frames + 1] int32
    max_seqlen: int
    rows: torch.Tensor  # [total_patches] int64
    cols: torch.Tensor  # [total_patches] int64

    @property
    def total(self) -> int:
        return self.rows.numel()


def check_grid_thw(grid_thw: torch.Tensor) -> torch.Tensor:
    grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3 or grid_thw.is_floating_point():
        raise ValueError(f"grid_thw must be an integer [num_items, 3] tensor (t, h, w); got {grid_thw.dtype} "
                         f"{tuple(grid_thw.shape)}")  # fmt: skip
    if grid_thw.numel() and int(grid_thw.min()) <= 0:
        raise ValueError(f"grid_thw entries must be positive; got {grid_thw.tolist()}")
    return grid_thw.long()


def pack_grid(grid_thw: torch.Tensor, device: torch.device | str | None = None) -> PackedGrid:
    """All index tensors for a packed batch, built without a Python loop over frames."""
    grid_thw = check_grid_thw(grid_thw).to(device)
    t, h, w = grid_thw.unbind(-1)
    frame_hw = torch.stack([h.repeat_interleave(t), w.repeat_interleave(t)], dim=-1)
    lengths = frame_hw[:, 0] * frame_hw[:, 1]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=grid_thw.device)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=total)
    local = torch.arange(total, device=grid_thw.device) - starts
    width = torch.repeat_interleave(frame_hw[:, 1], lengths, output_size=total)
    return PackedGrid(
        grid_thw=grid_thw,
        frame_hw=frame_hw,
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        rows=local // width,
        cols=local % width,
    )
