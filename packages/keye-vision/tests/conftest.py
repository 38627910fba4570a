"""Shared fixtures: small checkpoints written the way released Keye checkpoints are laid out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # pytest runs with --import-mode=importlib: make tests/media.py importable
    sys.path.insert(0, HERE)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 2) -> Path:
    """safetensors shards + ``model.safetensors.index.json`` + ``config.json``, tensors split by name."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def checkpoint_writer(tmp_path: Path):
    def write(tensors: dict[str, torch.Tensor], config: dict, shards: int = 2, name: str = "ckpt") -> Path:
        return write_checkpoint(tmp_path / name, tensors, config, shards)

    return write


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two cores shared with other test processes: OpenMP threads then wait on each other and small
    tensor ops slow down ~100x. One thread for these tests; the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
