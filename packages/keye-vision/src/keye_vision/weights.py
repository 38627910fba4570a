"""Load a module's weights out of a composite Keye checkpoint by name prefix (DESIGN §7).

A checkpoint folder holds ``model.safetensors.index.json`` plus shards, or a single
``model.safetensors``. Only the shards holding the wanted prefix are opened and only those tensors
read, so loading the ViT never touches the decoder's tens of gigabytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Released tensors under the vision prefix that this tower does not use: SigLIP's pooling head, and the
# packing position table of the Keye-VL-1.5 tower (it interpolates position_embedding instead).
IGNORED = ("head.", "embeddings.packing_position_embedding.")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class LoadReport:
    """What a load did, by parameter name (without the prefix)."""

    path: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    misshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def raise_if_incomplete(self) -> LoadReport:
        if self.missing or self.unexpected:
            raise ValueError(
                f"checkpoint {self.path} (prefix {self.prefix!r}) does not match the model: "
                f"missing {self.missing}, unexpected {self.unexpected}"
            )
        return self


def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    return json.loads(file.read_text())


def weight_map(path: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (or the one file when there is no index)."""
    root = Path(path)
    if (root / INDEX).is_file():
        index = json.loads((root / INDEX).read_text())
        if "weight_map" not in index:
            raise ValueError(f"{root / INDEX} has no 'weight_map'")
        return {name: root / shard for name, shard in index["weight_map"].items()}
    if (root / SINGLE).is_file():
        with safe_open(root / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), root / SINGLE)
    raise FileNotFoundError(f"no {INDEX} or {SINGLE} in checkpoint folder {root}")


def load_prefixed(module: nn.Module, path: str | Path, prefix: str) -> LoadReport:
    """Copy every ``prefix + name`` tensor into ``module``'s parameter ``name``.

    A shape mismatch is refused (ValueError naming every misshaped tensor) before anything is copied;
    missing and unexpected names are reported, and ``raise_if_incomplete`` turns them into an error.
    """
    report = LoadReport(path=str(path), prefix=prefix)
    wanted = dict(module.state_dict(keep_vars=True))
    by_shard: dict[Path, list[str]] = {}
    for full, shard in weight_map(path).items():
        if not full.startswith(prefix):
            continue
        name = full[len(prefix) :]
        if name in wanted:
            by_shard.setdefault(shard, []).append(name)
        elif name.startswith(IGNORED):
            report.ignored.append(name)
        else:
            report.unexpected.append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} named by the index of {path} does not exist")
        with safe_open(shard, framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(prefix + name)
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            report.misshaped[name] = (tuple(tensor.shape), tuple(wanted[name].shape))
    if report.misshaped:
        detail = ", ".join(f"{n}: checkpoint {c} vs model {m}" for n, (c, m) in report.misshaped.items())
        raise ValueError(f"checkpoint {path} (prefix {prefix!r}) has misshaped tensors: {detail}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            wanted[name].copy_(tensor)
    report.loaded = sorted(tensors)
    report.missing = sorted(set(wanted) - set(tensors))
    report.unexpected.sort()
    return report


def load_vision_weights(
    vit: nn.Module,
    path: str | Path,
    projector: nn.Module | None = None,
    *,
    vision_prefix: str = "visual.vision_model.",
    projector_prefix: str = "mlp_AR.",
) -> dict[str, LoadReport]:
    """Load the ViT (and projector) from a composite Keye checkpoint; returns one report per part."""
    reports = {"vision": load_prefixed(vit, path, vision_prefix)}
    if projector is not None:
        reports["projector"] = load_prefixed(projector, path, projector_prefix)
    return reports
