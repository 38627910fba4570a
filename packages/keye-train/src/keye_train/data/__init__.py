"""Training data: JSONL chat records, ratio mixing, token-budget packing, resumable sampling (DESIGN §8)."""

from keye_train.data.datamodule import KeyeDataModule, Source
from keye_train.data.dataset import ChatSources, PackCollator, SampleEncoder, Skipped
from keye_train.data.plan import mixed_items, packed
from keye_train.data.predictions import PredictionWriter
from keye_train.data.records import JsonlFile, Record, RecordError, parse_record
from keye_train.data.report import BadRecordReport
from keye_train.data.sampler import PackedBatchSampler

__all__ = [
    "BadRecordReport",
    "ChatSources",
    "JsonlFile",
    "KeyeDataModule",
    "PackCollator",
    "PackedBatchSampler",
    "PredictionWriter",
    "Record",
    "RecordError",
    "SampleEncoder",
    "Skipped",
    "Source",
    "mixed_items",
    "packed",
    "parse_record",
]
