"""Hugging Face checkpoints: sharded safetensors + ``model.safetensors.index.json`` + ``config.json``.

Experts load from either released form: per-expert tensors ``mlp.experts.E.{gate,up,down}_proj.weight``
(Qwen3-MoE, Keye-VL) or the fused transformers-v5 tensors ``mlp.experts.{gate_up_proj,down_proj}``.
Loading is lazy: every key and shape is checked against the model from the shards' headers first (so
a bad checkpoint fails before any data moves, naming each missing, unexpected or misshaped tensor),
then the model is materialized once and each tensor is copied straight into its parameter, shard by
shard, from memory-mapped files.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keye_moe.config import DecoderConfig
from keye_moe.layers.router import Router

if TYPE_CHECKING:
    from keye_moe.model import KeyeMoeForCausalLM

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names every offending tensor."""


@dataclass
class _Slot:
    """Where one checkpoint tensor goes: a parameter, or one expert's slice of a stacked parameter."""

    param: str
    view: Callable[[torch.Tensor], torch.Tensor]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _expert_view(e: int, proj: str, inter: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if proj == "gate_proj":
        return lambda t: t[e, :inter]
    if proj == "up_proj":
        return lambda t: t[e, inter:]
    return lambda t: t[e]


# ---------------------------------------------------------------------- reading
def checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> shard file (from the index, or a single ``model.safetensors``)."""
    index = path / INDEX_NAME
    if index.is_file():
        content = json.loads(index.read_text())
        if "weight_map" not in content:
            raise CheckpointError(f"{index} has no 'weight_map'")
        return {k: path / f for k, f in content["weight_map"].items()}
    single = path / SINGLE_NAME
    if single.exists():
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def read_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype string), read from the shard headers only."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, f in files.items():
        by_file[f].append(key)
    out = {}
    for f, keys in by_file.items():
        if not f.exists():
            raise FileNotFoundError(f"the checkpoint index names {f.name}, which does not exist")
        with safe_open(str(f), "pt") as handle:
            for key in keys:
                sl = handle.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _plan(model: KeyeMoeForCausalLM, keys: set[str], allow_missing: Callable[[str], bool]):
    """Match checkpoint keys to model tensors: (slots, missing, unexpected)."""
    state = model.state_dict(keep_vars=True)
    tied = model.config.tie_word_embeddings
    slots: dict[str, _Slot] = {}
    missing: list[str] = []
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        is_experts = name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
        if name in keys or not is_experts:
            if name in keys:
                slots[name] = _Slot(name, _whole)
            elif not allow_missing(name):
                missing.append(name)
            continue
        prefix, stacked = name.rsplit(".", 1)
        projs = ("gate_proj", "up_proj") if stacked == "gate_up_proj" else ("down_proj",)
        inter = tensor.shape[1] // 2 if stacked == "gate_up_proj" else tensor.shape[2]
        for e in range(tensor.shape[0]):
            for proj in projs:
                key = f"{prefix}.{e}.{proj}.weight"
                if key in keys:
                    slots[key] = _Slot(name, _expert_view(e, proj, inter))
                else:
                    missing.append(key)
    unexpected = sorted(k for k in keys if k not in slots and not (tied and k == "lm_head.weight"))
    return slots, missing, unexpected


def _summarize(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_load_plan(
    path: Path, target: str, misshaped: list[str], missing: list[str], unexpected: list[str], strict: bool
) -> None:
    """Refuse a checkpoint that does not fit, naming every offending tensor; warn when non-strict."""
    problems = []
    if misshaped:
        problems.append(f"shape mismatch for {len(misshaped)} tensor(s): " + "; ".join(misshaped[:20]))
    if missing and strict:
        problems.append(f"missing {len(missing)} tensor(s): {_summarize(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_summarize(unexpected)}")
    if problems:
        raise CheckpointError(f"cannot load {path} into {target}: " + " | ".join(problems))
    if missing or unexpected:
        log.warning(
            "loading %s non-strictly: missing %s; unexpected %s",
            path,
            _summarize(missing),
            _summarize(unexpected),
        )


def load_pretrained(
    cls: type[KeyeMoeForCausalLM],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: DecoderConfig | None = None,
    strict: bool = True,
) -> KeyeMoeForCausalLM:
    from keye_moe.model import build_on_meta

    path = Path(path)
    if config is None:
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} has no config.json (pass config= to load bare weights)")
        config = DecoderConfig.from_hf_config(json.loads(config_file.read_text()))
    files = checkpoint_files(path)
    headers = read_headers(files)
    model = build_on_meta(config)
    has_indexer = model.model.layers[0].self_attn.backend_module_name is not None

    def is_indexer(name: str) -> bool:
        return ".self_attn.sa_indexer." in name

    ckpt_has_indexer = any(is_indexer(k) for k in headers)
    keys = set(headers)
    if not has_indexer and config.sa_config is not None and ckpt_has_indexer:
        ignored = sorted(k for k in keys if is_indexer(k))
        log.warning(
            "no DSA backend: ignoring %d sa_indexer tensors (%s)", len(ignored), _summarize(ignored, 3)
        )
        keys -= set(ignored)

    def allow_missing(name: str) -> bool:
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            return True  # a checkpoint trained without the aux-loss-free bias: start it at zero
        return is_indexer(name) and not ckpt_has_indexer

    slots, missing, unexpected = _plan(model, keys, allow_missing)
    params = model.state_dict(keep_vars=True)
    mismatched = []
    for key, slot in slots.items():
        want = tuple(slot.view(params[slot.param]).shape)
        if want != headers[key][0]:
            mismatched.append(f"{key}: checkpoint {list(headers[key][0])}, model {list(want)}")
    check_load_plan(path, "KeyeMoeForCausalLM", mismatched, missing, unexpected, strict)

    if dtype is None:
        first = next((d for _, d in headers.values() if d in SAFETENSORS_DTYPES), "F32")
        dtype = SAFETENSORS_DTYPES[first]
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():  # balancing state absent from older checkpoints starts at zero
        for module in model.modules():
            if isinstance(module, Router) and module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()
                module.expert_load.zero_()  # type: ignore[union-attr]
    if missing:  # non-strict, or the optional bias / indexer: give everything a defined value first
        model.init_weights()
    if has_indexer and not ckpt_has_indexer:
        log.warning("%s has no sa_indexer weights: the DSA indexers start fresh (dense warm-up stage)", path)
        for layer in model.model.layers:
            layer.self_attn.mount(model.attention_backend)
            name = layer.self_attn.backend_module_name
            getattr(layer.self_attn, name).to(device=device, dtype=dtype)
    params = model.state_dict(keep_vars=True)  # the materialized tensors, not the meta ones
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in slots:
        by_file[files[key]].append(key)
    with torch.no_grad():
        for f, shard_keys in by_file.items():
            with safe_open(str(f), "pt", device="cpu") as handle:
                for key in shard_keys:
                    slot = slots[key]
                    slot.view(params[slot.param]).copy_(handle.get_tensor(key))
    model.eval()
    return model


# ---------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'; got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def export_tensors(
    model: KeyeMoeForCausalLM, expert_format: str = "per_expert"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor view) pairs in state-dict order, experts split per expert if asked."""
    if expert_format not in ("per_expert", "fused"):
        raise ValueError(f"expert_format must be 'per_expert' or 'fused'; got {expert_format!r}")
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if expert_format == "per_expert" and name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", tensor[e, :inter]
                yield f"{prefix}{e}.up_proj.weight", tensor[e, inter:]
        elif expert_format == "per_expert" and name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


def save_pretrained(
    model: KeyeMoeForCausalLM,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    expert_format: str = "per_expert",
) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in export_tensors(model, expert_format):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in shard}
        save_file(data, str(path / fname), metadata={"format": "pt"})
        for name, t in data.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del data
    (path / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    dtype = next(model.parameters()).dtype
    hf = model.config.to_hf_config()
    hf["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
