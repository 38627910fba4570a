"""Two CPU processes (DDP over gloo) train exactly like one process seeing both ranks' packs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import demo_data, metrics, stage_config

pytest.importorskip("torchcodec")


def fit(config: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "keye_train.cli", "fit", "--config", str(config), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    data = demo_data(tmp_path / "data", train=8)
    # the router balance loss is a per-rank statistic (as in Megatron), not a token sum: leave it out
    options = {"trainer.max_steps": 3, "data.num_workers": 0, "data.token_budget": 1024,
               "model.init_args.aux_loss_coef": 0.0}  # fmt: skip
    one = tmp_path / "one"
    fit(stage_config("stage2_sft", data, one, **options), "--data.packs_per_batch=2")
    two = tmp_path / "two"
    fit(
        stage_config("stage2_sft", data, two, **options),
        "--data.packs_per_batch=1", "--trainer.strategy=ddp", "--trainer.devices=2",
    )  # fmt: skip
    single, ddp = metrics(one, "train/lm_loss"), metrics(two, "train/lm_loss")
    assert len(single) == len(ddp) == 3
    assert ddp == pytest.approx(single, rel=1e-5), (single, ddp)
