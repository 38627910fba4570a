"""Each tiny stage config trains through LightningCLI, its loss falls, frozen weights stay bit-identical."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import demo_data, metrics, stage_config

from keye_train.cli import lightning_cli

pytest.importorskip("torchcodec")
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("tg"))


class Snapshot(L.Callback):
    """Parameters (by name) when training starts and when it ends."""

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        self.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def changed(self) -> set[str]:
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def fit(config: Path) -> Snapshot:
    cli = lightning_cli(["--config", str(config)], run=False)
    snapshot = Snapshot()
    cli.trainer.callbacks.append(snapshot)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return snapshot


STAGES = {
    # stage: (loss column, parameters that must train: every other one must stay bit-identical)
    "stage0_align": ("train/lm_loss", "mlp_AR."),
    "stage1_pretrain": ("train/lm_loss", ""),
    "stage2_sft": ("train/lm_loss", ""),
    "stage3_longctx": ("train/lm_loss", ""),
    "dsa_warmup": ("train/indexer_kl", "sa_indexer."),
    "dsa_sparse": ("train/lm_loss", ""),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_tiny_stage_trains_and_freezes(stage, data, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["keye-train"])
    column, trained = STAGES[stage]
    overrides = {"trainer.max_steps": STEPS, "data.num_workers": 0, "data.token_budget": 1024}
    if stage == "stage3_longctx":
        overrides["data.token_budget"] = 2048  # a long sample holds three clips
    # the same data again and again: a working trainer must push the loss down within a few steps
    overrides["data.samples_per_epoch"] = 2
    snapshot = fit(stage_config(stage, data, tmp_path, **overrides))
    losses = metrics(tmp_path, column)
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), f"{stage}: {column} did not fall: {losses}"
    changed = snapshot.changed()
    assert changed, f"{stage}: no parameter moved"
    frozen_moved = sorted(n for n in changed if trained not in n)
    assert not frozen_moved, f"{stage}: frozen parameters changed: {frozen_moved[:5]}"
    if trained:  # every parameter of the trained part moved (none silently frozen)
        assert {n for n in snapshot.before if trained in n} == changed
