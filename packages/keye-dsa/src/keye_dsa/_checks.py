"""Input validation shared by the public ops: each failure names the input and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}); got shape {tuple(x.shape)}")


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64); got {x.dtype}")


def check_same(name_a: str, a: int, name_b: str, b: int) -> None:
    if a != b:
        raise ValueError(f"{name_a} ({a}) must equal {name_b} ({b})")


def check_indices(indices: torch.Tensor, num_keys: int, validate: bool = True) -> None:
    """Indices are int32/int64 key positions in ``[0, num_keys)`` or -1 for an empty slot."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 (or int64); got {indices.dtype}")
    if validate and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= num_keys:
            raise IndexError(
                f"indices must lie in [-1, {num_keys - 1}] (-1 marks an empty slot); "
                f"got values in [{lo}, {hi}]"
            )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    check_rank("cu_seqlens", cu_seqlens, 1, "[num_seqs + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32; got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token count {total}; got {cu_seqlens.tolist()}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
