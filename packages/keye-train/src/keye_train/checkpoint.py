"""Composite Keye-VL checkpoints: one set of safetensors shards for tower, projector and decoder.

Layout (DESIGN §7): ``model-0000i-of-0000n.safetensors`` shards, ``model.safetensors.index.json`` and
``config.json`` in the released Keye-VL form. Tensor names are the model's own state-dict names, except
that the decoder's stacked experts are written per expert: keye-moe's exporter and shard writer run
over the whole composite (they only need ``state_dict()`` and ``config``). Loading accepts per-expert and
fused expert tensors alike.

Loading is checked before any data moves: every missing, unexpected or misshaped tensor is named. Two
gaps are allowed and reported: ``sa_indexer`` weights (a checkpoint from before DSA training: the
indexers start fresh for the dense warm-up stage) and the optional aux-loss-free expert bias.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from keye_moe.checkpoint import (
    PER_EXPERT_KEY,
    SAFETENSORS_DTYPES,
    check_load_plan,
    checkpoint_files,
    read_headers,
)

if TYPE_CHECKING:
    from keye_train.modeling import KeyeVLForConditionalGeneration

log = logging.getLogger(__name__)

VISION_PREFIX = "visual.vision_model."


@dataclass
class LoadReport:
    """What ``from_pretrained`` did, by checkpoint tensor name."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # released tensors Keye does not use (SigLIP head)
    fresh_indexers: bool = False  # sa_indexer weights were absent and start from a fresh init


def _is_indexer(name: str) -> bool:
    return ".self_attn.sa_indexer." in name


def _ignored(name: str) -> bool:
    from keye_vision.weights import IGNORED

    return name.startswith(VISION_PREFIX) and name[len(VISION_PREFIX) :].startswith(IGNORED)


def export_tensors(model: KeyeVLForConditionalGeneration, expert_format: str = "per_expert"):
    """(checkpoint name, tensor view) for every tensor, in state-dict order: keye-moe's export applied to
    the whole model (the composite's state-dict names are the checkpoint names; experts are split)."""
    from keye_moe.checkpoint import export_tensors as moe_export

    return moe_export(model, expert_format)  # type: ignore[arg-type]


def save_pretrained(
    model: KeyeVLForConditionalGeneration,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    expert_format: str = "per_expert",
) -> None:
    """Shards of at most ``max_shard_size``, the index and ``config.json`` (the composite layout), written
    by keye-moe's shard writer over the whole model; one shard is in memory at a time."""
    from keye_moe.checkpoint import save_pretrained as moe_save

    moe_save(model, path, max_shard_size=max_shard_size, expert_format=expert_format)  # type: ignore[arg-type]


def _targets(model: KeyeVLForConditionalGeneration) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every name a checkpoint may use -> the model tensor (or expert slice) it fills, and for each
    stacked expert tensor the per-expert names that together fill it."""
    fused = dict(export_tensors(model, "fused"))
    per_expert = {k: v for k, v in export_tensors(model, "per_expert") if k not in fused}
    groups: dict[str, list[str]] = defaultdict(list)
    for name in per_expert:
        match = PER_EXPERT_KEY.match(name)
        assert match is not None, name
        stacked = "down_proj" if match["proj"] == "down_proj" else "gate_up_proj"
        groups[f"{match['prefix']}.{stacked}"].append(name)
    return {**fused, **per_expert}, dict(groups)


def plan_load(model: KeyeVLForConditionalGeneration, headers: dict[str, tuple[tuple[int, ...], str]]):
    """Match checkpoint names to model tensors: (chosen names, missing, unexpected, ignored, misshaped)."""
    targets, groups = _targets(model)
    chosen: list[str] = []
    missing: list[str] = []
    for name in dict(export_tensors(model, "fused")):
        if name in headers:
            chosen.append(name)
        elif name in groups and all(k in headers for k in groups[name]):
            chosen.extend(groups[name])
        elif name in groups and any(k in headers for k in groups[name]):
            missing.extend(k for k in groups[name] if k not in headers)
        else:
            missing.append(name)
    ignored = sorted(k for k in headers if _ignored(k))
    used = set(chosen) | set(ignored)
    unexpected = sorted(k for k in headers if k not in used)
    misshaped = [
        f"{k}: checkpoint {list(headers[k][0])}, model {list(targets[k].shape)}"
        for k in chosen
        if tuple(targets[k].shape) != headers[k][0]
    ]
    return chosen, missing, unexpected, ignored, misshaped


def load_pretrained(
    cls: type[KeyeVLForConditionalGeneration],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
) -> KeyeVLForConditionalGeneration:
    """Build on the meta device, check every name and shape from the headers, materialize once, then
    copy each tensor straight into its parameter, shard by shard. ``attn_implementation`` picks the
    decoder's attention backend (default: ``dsa`` when the config has ``sa_config`` and keye-dsa is
    installed); without an indexer-owning backend, ``sa_indexer`` tensors are ignored and listed.
    ``config_overrides`` change the checkpoint's config first (``KeyeVLConfig.replace`` arguments), e.g.
    ``{"text_config": {"sa_config": {...}}}`` to add DSA indexers to a checkpoint trained without them."""
    from keye_train.config import KeyeVLConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Keye-VL checkpoint folder?")
    config = KeyeVLConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    if config_overrides:
        config = config.replace(**config_overrides)
    if attn_implementation is not None:
        config.text_config = config.text_config.replace(attn_implementation=attn_implementation)
    files = checkpoint_files(path)
    headers = read_headers(files)
    with torch.device("meta"):
        model = cls(config)
    layers = model.model.layers
    model_has_indexer = bool(layers) and layers[0].self_attn.backend_module_name is not None
    ckpt_has_indexer = any(_is_indexer(k) for k in headers)
    report = LoadReport(str(path))
    if ckpt_has_indexer and not model_has_indexer:
        dropped = sorted(k for k in headers if _is_indexer(k))
        log.warning("no DSA attention backend installed: ignoring %d sa_indexer tensors", len(dropped))
        report.ignored += dropped
        headers = {k: v for k, v in headers.items() if not _is_indexer(k)}
    chosen, missing, unexpected, ignored, misshaped = plan_load(model, headers)
    report.ignored += ignored

    def optional(name: str) -> bool:
        return (_is_indexer(name) and not ckpt_has_indexer) or name.endswith(
            ".mlp.gate.e_score_correction_bias"
        )

    required = [k for k in missing if not optional(k)]
    check_load_plan(path, "KeyeVLForConditionalGeneration", misshaped, required, unexpected, strict)
    report.missing, report.unexpected = missing, unexpected

    if dtype is None:
        dtype = SAFETENSORS_DTYPES.get(next((d for _, d in headers.values()), "F32"), torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to_empty(device=device)
    model.to(dtype=dtype)
    if missing:
        _fresh_init(model)  # defined values for whatever the checkpoint does not hold
    if model_has_indexer and not ckpt_has_indexer:
        log.warning("%s has no sa_indexer weights: the DSA indexers start fresh (dense warm-up stage)", path)
        report.fresh_indexers = True
        for layer in layers:
            layer.self_attn.mount(model.decoder.attention_backend)
            getattr(layer.self_attn, layer.self_attn.backend_module_name).to(device=device, dtype=dtype)
    targets, _ = _targets(model)  # views of the materialized tensors
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in chosen:
        by_file[files[name]].append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as handle:
                for name in names:
                    targets[name].copy_(handle.get_tensor(name))
    report.loaded = len(chosen)
    model.load_report = report
    return model.eval()


@torch.no_grad()
def _fresh_init(model: KeyeVLForConditionalGeneration) -> None:
    """Initial values for a model materialized with ``to_empty``: each module's own initializer."""
    for module in _modules_with_reset(model):
        module.reset_parameters()
    model.decoder.init_weights()


def _modules_with_reset(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            yield module
