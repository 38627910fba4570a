"""Writes what ``keye-train predict`` generated as JSONL, one line per prompt, on global rank zero."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """``{"where": "file.jsonl:LINE", "reply": ..., "reference": ...}`` lines in ``path`` (default:
    ``predictions.jsonl`` in the trainer's log folder)."""

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module, predictions: Any, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part or []]
        if not trainer.is_global_zero:
            return
        path = Path(self.path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["where"])))
        print(f"wrote {len(rows)} predictions to {path}")
