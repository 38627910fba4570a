"""The data module: measuring with workers, excluding bad records by path, late failures in workers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import ByteEncoder, chat, write_jsonl

from keye_train.data import KeyeDataModule, Source


def _image_chat(path: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": path}]},
                         {"role": "assistant", "content": "an image"}]}  # fmt: skip


def test_bad_records_are_excluded_counted_and_late_failures_reported(tmp_path):
    (tmp_path / "img.png").write_bytes(b"png")
    (tmp_path / "late.png").write_bytes(b"png")
    short = write_jsonl(
        tmp_path / "short.jsonl",
        [chat(f"q{i}", f"answer {i}") for i in range(12)]
        + ["{broken", _image_chat("missing.png"), chat("x" * 500, "too long"), _image_chat("img.png")]
        + [_image_chat("late.png")],
    )
    long = write_jsonl(tmp_path / "long.jsonl", [chat("long question " * 4, f"a{i}") for i in range(6)])
    dm = KeyeDataModule(
        [Source(str(short), 1.0), Source(str(long), 1.0)],
        token_budget=128, num_workers=2, encoder=ByteEncoder(), samples_per_epoch=24,
    )  # fmt: skip
    dm.setup("fit")
    kinds = {s.where.rsplit("/", 1)[-1]: s.kind for s in dm.excluded}
    assert kinds == {"short.jsonl:13": "invalid record", "short.jsonl:14": "missing file",
                     "short.jsonl:15": "over-long"}  # fmt: skip
    (tmp_path / "late.png").unlink()  # fails after measuring: must come back inside a batch
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    late = [s for b in batches for s in b["skipped"]]
    assert late and all(s.where.endswith("short.jsonl:17") and s.kind == "missing file" for s in late)
    for b in batches:
        cu = b["cu_seqlens"]
        assert cu[0] == 0 and int(cu[-1]) == b["input_ids"].shape[1] <= 128
        assert b["num_samples"] == len(cu) - 1
        assert b["position_ids"].shape == (3, 1, b["input_ids"].shape[1])


def test_state_dict_restarts_the_stream_mid_epoch(tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [chat(f"question {i}", f"answer {i}" * (i % 3 + 1)) for i in range(30)]
    )

    def module():
        return KeyeDataModule([Source(str(data))], token_budget=64, num_workers=0, encoder=ByteEncoder())

    first = module()
    first.setup("fit")
    loader = first.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    whole = [b["input_ids"] for b in loader]
    second = module()
    second.setup("fit")
    loader = second.train_dataloader()
    loader.load_state_dict({"epoch": 1, "consumed": 2, "seed": 0})  # what Lightning restores
    loader.batch_sampler.set_epoch(1)
    rest = [b["input_ids"] for b in loader]
    assert len(loader) == len(whole)  # Lightning still sees the whole epoch's length
    assert len(rest) == len(whole) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[2:]))


class CountingEncoder(ByteEncoder):
    calls = 0

    def encode(self, messages):
        CountingEncoder.calls += 1
        return super().encode(messages)


def test_measured_counts_are_cached_per_file_and_processor(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", "a" * (i * 40)) for i in range(8)])

    def plan(budget):
        options = {"num_workers": 0, "encoder": CountingEncoder(), "cache_dir": str(tmp_path / "cache")}
        dm = KeyeDataModule([Source(str(data))], token_budget=budget, **options)
        dm.setup("fit")
        return dm.plans["train"]

    first = plan(400)
    assert CountingEncoder.calls == 8
    again = plan(200)  # a smaller budget reuses the counts and excludes more
    assert CountingEncoder.calls == 8
    assert again.lengths[0][:3] == first.lengths[0][:3]
    assert len(again.excluded) > len(first.excluded) and all(s.kind == "over-long" for s in again.excluded)
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # the file changed
    assert len(plan(400).lengths[0]) == 9 and CountingEncoder.calls == 8 + 9
