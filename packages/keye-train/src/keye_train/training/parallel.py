"""Freezing by name pattern, activation checkpointing and FSDP2 sharding, applied per block.

A "block" is an element of any ``nn.ModuleList`` called ``layers`` (decoder layers and ViT encoder
layers alike), so the same code serves the composed Keye-VL model and a bare decoder.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn


def freeze(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Train exactly the parameters whose names match a pattern (fnmatch); every pattern must match."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in trainable if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        sample = ", ".join(names[:6])
        raise ValueError(
            f"trainable pattern(s) {unmatched} match no parameter (names look like: {sample}, ...)"
        )
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in trainable))
        if param.requires_grad:
            chosen.append(name)
    return chosen


def blocks(model: nn.Module) -> list[nn.Module]:
    """Every element of every ``nn.ModuleList`` named ``layers``, outermost lists first."""
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            found.extend(module)
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass (composable, parameter names kept)."""
    from torch.distributed._composable import checkpoint

    found = blocks(model)
    for block in found:
        checkpoint(block)
    return len(found)


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None) -> int:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, heads, norms)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    found = blocks(model)
    for block in found:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(found)
