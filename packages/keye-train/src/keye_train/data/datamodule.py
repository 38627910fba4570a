"""The LightningDataModule for chat JSONL sources: measure once, mix, pack, decode in workers, resume.

At ``setup`` every record is measured once (its token count; records may declare ``num_tokens`` to
skip this), split across ranks and gathered. Bad and over-long records are excluded there and
reported each epoch. The sampler then plans packs from the counts alone, so data order depends only on
the seed, and the train loader's checkpoint state (epoch, batches consumed) restarts it mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from keye_train.data.dataset import (
    ChatSources,
    Measure,
    PackCollator,
    PromptCollator,
    Prompts,
    SampleEncoder,
    Skipped,
)
from keye_train.data.plan import default_samples_per_epoch
from keye_train.data.records import JsonlFile
from keye_train.data.sampler import PackedBatchSampler


@dataclass
class Source:
    """One JSONL file and its share of the mixture (ratios are relative: 1 and 1 alternate)."""

    path: str
    ratio: float = 1.0


def _first(batch: list) -> Any:
    return batch[0]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_context(num_workers: int) -> str | None:
    """How loader workers start: from a fork server once a process group exists. Forking a process
    whose communication threads (gloo, NCCL) hold locks can leave the child deadlocked before it runs
    (seen with two gloo ranks on CPU); a fresh server process has no such threads."""
    if num_workers > 0 and _dist()[1] > 1:
        return "forkserver"
    return None


@dataclass
class Plan:
    """What measuring a split found: token counts, usable records, excluded records."""

    sources: ChatSources
    ratios: list[float]
    lengths: list[list[int]]
    valid: list[list[int]]
    excluded: list[Skipped]


def measure(
    sources: ChatSources,
    ratios: Sequence[float],
    num_workers: int,
    cache_dir: str | None = None,
    key: str = "",
) -> Plan:
    """Token count of every record (this rank's share computed here, the rest gathered), read from
    ``cache_dir`` when the same file was measured with the same processor before."""
    rank, world = _dist()
    cached = [_read_cache(cache_dir, file, key) for file in sources.files]
    items = [(s, i) for s, n in enumerate(sources.sizes()) if cached[s] is None for i in range(n)]
    loader = DataLoader(
        Measure(sources, items[rank::world]), batch_size=1, num_workers=num_workers, collate_fn=_first,
        multiprocessing_context=worker_context(num_workers),
    )  # fmt: skip
    results = list(loader)
    if world > 1:
        gathered: list[list | None] = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part or []]
    raw: list[list[int | Skipped]] = [
        c if c is not None else [-1] * n for c, n in zip(cached, sources.sizes())
    ]
    for (s, i), result in results:
        raw[s][i] = result
    if rank == 0:
        for s, file in enumerate(sources.files):
            if cached[s] is None:
                _write_cache(cache_dir, file, key, raw[s])
    lengths = [[-1] * n for n in sources.sizes()]
    excluded: list[Skipped] = []
    for s, per in enumerate(raw):
        for i, result in enumerate(per):
            bad = result if isinstance(result, Skipped) else sources.over_long((s, i), result)
            if bad is not None:
                excluded.append(bad)
            else:
                lengths[s][i] = result
    valid = [[i for i, n in enumerate(per) if n >= 0] for per in lengths]
    for records, file in zip(valid, sources.files):
        if not records:
            raise ValueError(f"data source {file.path} has no usable record (see the skipped-record list)")
    return Plan(sources, list(ratios), lengths, valid, sorted(excluded, key=lambda x: x.where))


def _cache_path(cache_dir: str, file: JsonlFile, key: str) -> Path:
    stat = file.path.stat()
    digest = hashlib.sha1(
        f"{file.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{key}".encode()
    ).hexdigest()
    return Path(cache_dir) / f"{file.path.stem}-{digest[:16]}.json"


def _read_cache(cache_dir: str | None, file: JsonlFile, key: str) -> list[int | Skipped] | None:
    if cache_dir is None or not (path := _cache_path(cache_dir, file, key)).is_file():
        return None
    stored = json.loads(path.read_text())
    return [Skipped(**v) if isinstance(v, dict) else int(v) for v in stored]


def _write_cache(cache_dir: str | None, file: JsonlFile, key: str, raw: list[int | Skipped]) -> None:
    if cache_dir is None:
        return
    path = _cache_path(cache_dir, file, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([v.__dict__ if isinstance(v, Skipped) else v for v in raw]))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


class KeyeDataModule(L.LightningDataModule):
    """Chat JSONL sources mixed by ratio and packed to ``token_budget`` tokens per pack.

    Each step gives every rank ``packs_per_batch`` packs merged into one packed row (``cu_seqlens``).
    ``encoder`` turns messages into model inputs; by default a ``KeyeProcessor`` built from
    ``processor`` (a checkpoint folder with ``tokenizer.json``; the embedded tokenizer when None) and
    ``processor_options``. ``cache_dir`` keeps each file's measured token counts (keyed by the file's
    path, size, modification time and the processor settings) so later runs and stages skip measuring.
    """

    def __init__(
        self,
        train: list[Source],
        val: list[Source] | None = None,
        test: list[Source] | None = None,
        predict: list[Source] | None = None,
        *,
        token_budget: int = 4096,
        packs_per_batch: int = 1,
        samples_per_epoch: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        processor: str | None = None,
        processor_options: dict[str, Any] | None = None,
        encoder: SampleEncoder | None = None,
        cache_dir: str | None = None,
        predict_batch_size: int = 8,
    ):
        super().__init__()
        if not train:
            raise ValueError("train needs at least one source")
        self.train_sources = [s if isinstance(s, Source) else Source(**s) for s in train]
        self.val_sources = [s if isinstance(s, Source) else Source(**s) for s in val or []]
        self.test_sources = [s if isinstance(s, Source) else Source(**s) for s in test or []]
        self.predict_sources = [s if isinstance(s, Source) else Source(**s) for s in predict or []]
        self.token_budget = token_budget
        self.packs_per_batch = packs_per_batch
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.processor_path = processor
        self.processor_options = dict(processor_options or {})
        self._encoder = encoder
        self.cache_dir = cache_dir
        self.predict_batch_size = predict_batch_size
        self.plans: dict[str, Plan] = {}
        self.train_sampler: PackedBatchSampler | None = None

    @property
    def encoder(self) -> SampleEncoder:
        if self._encoder is None:
            from keye_train.data.encode import ProcessorEncoder

            self._encoder = ProcessorEncoder.build(self.processor_path, **self.processor_options)
        return self._encoder

    @property
    def excluded(self) -> list[Skipped]:
        plan = self.plans.get("train")
        return plan.excluded if plan else []

    def _plan(self, split: str, sources: list[Source]) -> Plan:
        if split not in self.plans:
            chat = ChatSources([s.path for s in sources], self.encoder, self.token_budget)
            # counts depend on the processor: its settings are part of the cache key
            key = json.dumps(
                [self.processor_path, self.processor_options, type(self.encoder).__name__], sort_keys=True
            )
            self.plans[split] = measure(
                chat, [s.ratio for s in sources], self.num_workers, self.cache_dir, key
            )
        return self.plans[split]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._plan("train", self.train_sources)
        if self.val_sources and stage in ("fit", "validate"):
            self._plan("val", self.val_sources)
        if self.test_sources and stage == "test":
            self._plan("test", self.test_sources)

    def _sampler(self, plan: Plan, samples_per_epoch: int, **options: Any) -> PackedBatchSampler:
        rank, world = _dist()
        return PackedBatchSampler(
            plan.lengths, plan.valid, options.pop("ratios", plan.ratios), token_budget=self.token_budget,
            samples_per_epoch=samples_per_epoch, rank=rank, world_size=world, seed=self.seed, **options,
        )  # fmt: skip

    def _loader(self, plan: Plan, sampler: PackedBatchSampler) -> DataLoader:
        options = {
            "batch_sampler": sampler,
            "collate_fn": PackCollator(self.encoder),
            "num_workers": self.num_workers,
            "multiprocessing_context": worker_context(self.num_workers),
        }
        if sampler.follow_epochs:
            return ResumableLoader(plan.sources, progress=self._consumed, **options)
        return DataLoader(plan.sources, **options)

    def _consumed(self) -> int:
        """Batches of the current epoch that training has consumed (workers may have fetched more)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        plan = self._plan("train", self.train_sources)
        samples = self.samples_per_epoch or default_samples_per_epoch(plan.valid, plan.ratios)
        self.train_sampler = self._sampler(plan, samples, packs_per_batch=self.packs_per_batch)
        return self._loader(plan, self.train_sampler)

    def _evaluation_loader(self, split: str, sources: list[Source]) -> DataLoader | list:
        if not sources:
            return []
        plan = self._plan(split, sources)
        # every usable record once, in a fixed order: evaluation never depends on the epoch
        sizes = [len(v) for v in plan.valid]
        sampler = self._sampler(plan, sum(sizes), ratios=sizes, follow_epochs=False, drop_last=False)
        return self._loader(plan, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("val", self.val_sources)

    def test_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("test", self.test_sources)

    def predict_dataloader(self) -> DataLoader | list:
        """Every record of ``predict`` as a prompt (up to its last assistant turn), this rank's share,
        left-padded in batches of ``predict_batch_size`` for ``model.generate``."""
        if not self.predict_sources:
            return []
        chat = ChatSources([s.path for s in self.predict_sources], self.encoder, self.token_budget)
        rank, world = _dist()
        items = [(s, i) for s, n in enumerate(chat.sizes()) for i in range(n)][rank::world]
        return DataLoader(
            Prompts(chat, items), batch_size=self.predict_batch_size, num_workers=self.num_workers,
            collate_fn=PromptCollator(self.encoder), multiprocessing_context=worker_context(self.num_workers),
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The processor settings, so ``keye-train export`` can save the processor with the model.

        (Where the data stream stands is the train loader's own state, which Lightning checkpoints.)
        """
        return {"processor": self.processor_path, "processor_options": self.processor_options}


class ResumableLoader(DataLoader):
    """A DataLoader whose state (epoch, batches consumed) Lightning saves in every checkpoint and
    restores before iterating, so a resumed run continues the epoch's stream where it stopped."""

    def __init__(self, *args: Any, progress: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict(consumed=self.progress())

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state_dict)
