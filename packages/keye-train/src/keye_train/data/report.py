"""Counts every record left out of an epoch and reports them by path when the epoch ends.

Records found bad while measuring (before training) are excluded from the stream; records that fail
later in a worker are dropped from their batch. Both kinds end up in one per-epoch report, printed on
rank zero and written as JSON beside the logs, and the counts are logged as metrics.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

from keye_train.data.dataset import Skipped


def _gather(items: list[Skipped]) -> list[Skipped]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    gathered: list[list[Skipped] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [s for part in gathered for s in part or []]


def summarize(skipped: list[Skipped], limit: int = 20) -> str:
    counts = Counter(s.kind for s in skipped)
    lines = [f"{len(skipped)} records skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    for s in skipped[:limit]:
        lines.append(f"  {s.where}: {s.kind}: {s.reason}")
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (see the JSON report)")
    return "\n".join(lines)


class BadRecordReport(L.Callback):
    """Collects ``batch["skipped"]`` and the data module's excluded records; reports each epoch."""

    def __init__(self) -> None:
        self.seen: dict[str, Skipped] = {}  # this epoch, this rank, by location

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for s in batch.get("skipped", ()) if isinstance(batch, dict) else ():
            self.seen.setdefault(s.where, s)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        excluded = list(getattr(trainer.datamodule, "excluded", []) or []) if trainer.datamodule else []
        late = _gather(list(self.seen.values()))
        self.seen = {}
        everything = sorted({s.where: s for s in [*excluded, *late]}.values(), key=lambda s: s.where)
        pl_module.log("data/skipped_records", float(len(everything)), rank_zero_only=True)
        if not trainer.is_global_zero or not everything:
            return
        print(f"epoch {trainer.current_epoch}: {summarize(everything)}")
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"skipped_records_epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps([s.__dict__ for s in everything], indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"seen": [s.__dict__ for s in self.seen.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen = {s["where"]: Skipped(**s) for s in state_dict.get("seen", [])}
