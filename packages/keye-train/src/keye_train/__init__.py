"""keye-train: the Keye-VL model, its processor, and Lightning trainers for every stage (DESIGN §8)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so that `import keye_train` (the CLI, plugin listing) stays light.
_LAZY = {
    "KeyeVLConfig": "keye_train.config",
    "KeyeVLForConditionalGeneration": "keye_train.modeling",
    "KeyeProcessor": "keye_train.processor",
    "ProcessorConfig": "keye_train.processor",
    "KeyeTokenizer": "keye_train.tokenizer",
    "EncodedChat": "keye_train.processor",
    "VisionFrame": "keye_train.processor",
    "render_chat": "keye_train.chat",
    "rope_index": "keye_train.rope_index",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keye_train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
