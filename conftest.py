"""Repository-wide pytest setup: makes tools/ importable (the sample-media generator) and runs
Triton kernels in the interpreter when no CUDA GPU is present."""

import os
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - every package depends on torch
    pass
