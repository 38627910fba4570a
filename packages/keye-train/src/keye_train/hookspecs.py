"""Hooks that keye-train consumes (DESIGN §2). Each returns a dict of name -> factory.

keye-vision registers its encoder and keye-moe its decoder through these, by entry point, so the
composed model looks components up by name instead of importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("keye")

Factory = Callable[..., Any]


@hookspec
def keye_vision_encoders() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Vision towers by name (``keye-vit`` from keye-vision); factory(config) -> nn.Module."""


@hookspec
def keye_decoders() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Language decoders by name (``keye-moe`` from keye-moe); factory(config) -> nn.Module."""


@hookspec
def keye_datasets() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Training data sources by name; factory(**options) -> a map-style or iterable dataset."""


@hookspec
def keye_rewards() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Reward functions for RL stages; factory(**options) -> callable(sample, completion) -> float."""


@hookspec
def keye_teachers() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Teacher models for on-policy distillation; factory(**options) -> model."""


@hookspec
def keye_callbacks() -> dict[str, Factory]:  # type: ignore[empty-body]
    """Lightning callbacks by name; factory(**options) -> lightning.Callback."""
