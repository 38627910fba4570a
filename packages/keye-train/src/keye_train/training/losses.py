"""Token-level cross-entropy as (sum, count), so losses average over tokens across packs and ranks.

A packed row holds several samples of different lengths; averaging per rank and then across ranks
would weight a short sample's tokens more on a rank with fewer tokens. Summing and dividing by the
global token count gives every token the same weight whatever the split, which is also what makes
two data-parallel ranks reproduce one process exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy (fp32) over labelled positions, in chunks of tokens so the
    fp32 copy of the logits never exceeds ``chunk x vocab``; returns (sum, number of tokens)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, keep.numel(), chunk):
        rows = keep[start : start + chunk]
        total = total + F.cross_entropy(flat_logits[rows].float(), targets[rows], reduction="sum")
    return total, int(keep.numel())


def global_sum(value: float, device: torch.device) -> float:
    """``value`` summed over every data-parallel rank (itself when not distributed)."""
    value = torch.tensor(value, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return float(value)


def data_parallel_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
