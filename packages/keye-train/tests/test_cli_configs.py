"""Every stage config, tiny and full, parses through LightningCLI into the intended module; the
``keye-train`` command dispatches its own subcommands and LightningCLI's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from keye_train import cli
from keye_train.training import DSASparseTraining, DSAWarmupTraining, KeyeLMTraining

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ["stage0_align", "stage1_pretrain", "stage2_sft", "stage3_longctx", "dsa_warmup", "dsa_sparse"]
KINDS = {"dsa_warmup": DSAWarmupTraining, "dsa_sparse": DSASparseTraining}


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_parses(size, stage, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["keye-train"])
    path = CONFIGS / size / f"{stage}.yaml"
    assert path.is_file(), f"missing config {path}"
    # the full configs name 8-GPU FSDP2; parse them here on one CPU process (nothing is built or loaded)
    overrides = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                 "--trainer.num_nodes=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                 "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]  # fmt: skip
    parsed = cli.lightning_cli(["--config", str(path), *overrides], run=False)
    module = parsed.model
    assert type(module) is KINDS.get(stage, KeyeLMTraining)
    assert module.model is None  # built lazily in configure_model (meta / FSDP2 friendly)
    if stage == "stage0_align":
        assert module.trainable == ["mlp_AR.*"]
    if stage == "dsa_warmup":
        assert module.trainable == ["*.sa_indexer.*"]
    if stage == "dsa_sparse":
        assert module.kl_coef == 1.0
    if stage == "stage3_longctx":
        assert [s.ratio for s in parsed.datamodule.train_sources] == [1.0, 1.0]  # 1:1 long/short
    assert parsed.trainer.precision == ("32-true" if size == "tiny" else "bf16-mixed")


def test_export_needs_a_keye_checkpoint(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="sharded"):
        cli.main(["export", str(tmp_path), str(tmp_path / "out")])
