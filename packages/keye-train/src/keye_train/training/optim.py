"""AdamW with decay only on matrices, and a warm-up + cosine/linear/constant schedule per step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (``total_steps`` 0: taken from the trainer)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.1
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optimizer.schedule must be cosine, linear or constant; got {self.schedule!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"invalid optimizer settings: {self}")


def lr_factor(step: int, config: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(total_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    named: list[tuple[str, torch.nn.Parameter]], config: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Norm weights, biases and other vectors get no weight decay (the usual LLM recipe)."""
    if not named:
        raise ValueError("no trainable parameter: check the module's `trainable` patterns")
    decay = [p for _, p in named if p.ndim >= 2]
    keep = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )
    steps = config.total_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, steps))
    return optimizer, scheduler
