"""Map-style access to several JSONL sources, decoding and encoding each record in a worker.

A record that cannot be used comes back as a ``Skipped`` marker instead of an exception, so a missing
file or a corrupt video costs one sample, is counted, and is reported by path at the end of the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from keye_train.data.records import JsonlFile, Record, RecordError

Sample = Any  # what the encoder returns for one record (a mapping or, e.g., an EncodedChat)


class SampleEncoder(Protocol):
    """Turns one record's chat messages into model inputs, and a list of them into a packed batch."""

    def encode(self, messages: list[dict[str, Any]]) -> Sample: ...

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Skipped:
    """A record left out, where it is, and why."""

    where: str
    kind: str  # "invalid record" | "missing file" | "undecodable media" | "over-long" | "error"
    reason: str


def classify(exc: BaseException) -> str:
    if isinstance(exc, RecordError):
        return "invalid record"
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, (RuntimeError, OSError, ValueError)):
        return "undecodable media"
    return "error"


def num_tokens(sample: Any) -> int:
    ids = sample["input_ids"] if isinstance(sample, Mapping) else sample.input_ids
    return int(torch.as_tensor(ids).numel())


class ChatSources(torch.utils.data.Dataset):
    """Indexed by ``(source, record)``; returns an encoded sample or a ``Skipped``."""

    def __init__(self, paths: Sequence[str], encoder: SampleEncoder, max_tokens: int):
        self.files = [JsonlFile(path) for path in paths]
        self.encoder = encoder
        self.max_tokens = max_tokens

    def sizes(self) -> list[int]:
        return [len(f) for f in self.files]

    def record(self, item: tuple[int, int]) -> Record:
        source, index = item
        return self.files[source].read(index)

    def encode(self, item: tuple[int, int]) -> Sample | Skipped:
        """The encoded record, or why it cannot be used (its length is not checked here)."""
        where = self.files[item[0]].where(item[1])
        try:
            record = self.record(item)
            for path in record.media_paths():
                if not Path(path).exists():
                    raise FileNotFoundError(f"{path} does not exist")
            sample = self.encoder.encode(record.messages)
        except Exception as exc:  # a bad record must never stop the run: it is reported instead
            return Skipped(where, classify(exc), f"{type(exc).__name__}: {exc}")
        return sample

    def over_long(self, item: tuple[int, int], n: int) -> Skipped | None:
        if n <= self.max_tokens:
            return None
        where = self.files[item[0]].where(item[1])
        return Skipped(where, "over-long", f"{n} tokens, more than the {self.max_tokens}-token budget")

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:
        sample = self.encode(item)
        if isinstance(sample, Skipped):
            return sample
        return self.over_long(item, num_tokens(sample)) or sample

    def __len__(self) -> int:
        return sum(self.sizes())

    def declared_tokens(self, item: tuple[int, int]) -> int | None:
        """A record's own ``num_tokens`` field, which spares decoding it just to measure it."""
        try:
            value = self.record(item).extra.get("num_tokens")
        except RecordError:
            return None
        return int(value) if isinstance(value, int) and value > 0 else None


class Measure(torch.utils.data.Dataset):
    """Token counts of a list of items, computed in workers (encoding is the only exact count);
    the budget is not applied here, so counts can be cached whatever the budget."""

    def __init__(self, sources: ChatSources, items: Sequence[tuple[int, int]]):
        self.sources, self.items = sources, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[tuple[int, int], int | Skipped]:
        item = self.items[i]
        declared = self.sources.declared_tokens(item)
        if declared is not None:
            return item, declared
        result = self.sources.encode(item)
        return item, result if isinstance(result, Skipped) else num_tokens(result)


class PackCollator:
    """Drops skipped records from a batch (keeping them under ``"skipped"``) and packs the rest."""

    def __init__(self, encoder: SampleEncoder):
        self.encoder = encoder

    def __call__(self, results: Sequence[Sample | Skipped]) -> dict[str, Any]:
        samples = [r for r in results if not isinstance(r, Skipped)]
        skipped = [r for r in results if isinstance(r, Skipped)]
        batch = self.encoder.collate(samples) if samples else {}
        batch["skipped"] = skipped
        batch["num_samples"] = len(samples)
        return batch


class Prompts(torch.utils.data.Dataset):
    """Records as generation prompts: the messages before the last assistant turn, with that turn's text
    kept as the reference answer (for ``keye-train predict``)."""

    def __init__(self, sources: ChatSources, items: Sequence[tuple[int, int]]):
        self.sources, self.items = sources, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, str, Any]:
        item = self.items[i]
        where = self.sources.files[item[0]].where(item[1])
        try:
            messages = self.sources.record(item).messages
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            reference = messages[last]["content"]
            prompt = self.sources.encoder.encode_prompt(messages[:last])  # type: ignore[attr-defined]
        except Exception as exc:
            return where, "", Skipped(where, classify(exc), f"{type(exc).__name__}: {exc}")
        return where, reference if isinstance(reference, str) else "", prompt


class PromptCollator:
    """Left-padded prompts plus where each came from and its reference answer."""

    def __init__(self, encoder: SampleEncoder):
        self.encoder = encoder

    def __call__(self, results: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
        good = [r for r in results if not isinstance(r[2], Skipped)]
        batch = self.encoder.collate_prompts([r[2] for r in good]) if good else {}  # type: ignore[attr-defined]
        batch["where"] = [r[0] for r in good]
        batch["reference"] = [r[1] for r in good]
        batch["skipped"] = [r[2] for r in results if isinstance(r[2], Skipped)]
        batch["num_samples"] = len(good)
        return batch
