"""A corrupt video and a missing file cost one sample each: counted, reported by path, never fatal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import demo_data, metrics, stage_config

from keye_train.cli import lightning_cli

sample_media = pytest.importorskip("sample_media")
pytest.importorskip("torchcodec")


@pytest.mark.slow
def test_bad_records_are_reported_at_epoch_end(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["keye-train"])
    data = demo_data(tmp_path / "data", train=4)
    corrupt = sample_media.write_corrupt(tmp_path / "data" / "videos" / "corrupt.mp4")
    records = (tmp_path / "data" / "grounding_train.jsonl").read_text().splitlines()
    good = json.loads(records[0])
    bad = []
    for path in (str(corrupt), str(tmp_path / "data" / "videos" / "missing.mp4")):
        record = json.loads(json.dumps(good))
        record["messages"][0]["content"][0]["video"] = path
        bad.append(json.dumps(record))
    (tmp_path / "data" / "grounding_train.jsonl").write_text("\n".join([*records, *bad, "{oops"]) + "\n")
    out = tmp_path / "run"
    # 4 good samples, 2 per pack: an epoch is 2 steps; run 3 so one epoch ends
    config = stage_config("stage2_sft", data, out, **{"trainer.max_steps": 3, "data.token_budget": 1024,
                                                     "data.num_workers": 1, "data.val": None})  # fmt: skip
    cli = lightning_cli(["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    report = json.loads(next(out.rglob("skipped_records_epoch0.json")).read_text())
    kinds = {Path(r["where"]).name: r["kind"] for r in report}
    expected = {"5": "undecodable media", "6": "missing file", "7": "invalid record"}
    assert kinds == {f"grounding_train.jsonl:{line}": kind for line, kind in expected.items()}
    assert metrics(out, "data/skipped_records")[0] == 3.0
    assert len(metrics(out, "train/lm_loss")) == 3  # training went on
