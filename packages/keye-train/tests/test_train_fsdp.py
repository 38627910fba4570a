"""FSDP2 through Lightning's ModelParallelStrategy (per-layer fully_shard), two gloo CPU processes,
logs the same losses as one process that sees both ranks' packs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp2_equal.py"


@pytest.mark.slow
def test_fsdp2_two_cpu_ranks_match_one_process(tmp_path):
    out = tmp_path / "fsdp2.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--gpus", "2", "--steps", "3", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["fsdp2"]) == 3 and result["max_rel_diff"] < 1e-5
    assert result["single"][-1] < result["single"][0]
