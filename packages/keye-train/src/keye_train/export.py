"""``keye-train export``: a Lightning training checkpoint -> a composite safetensors checkpoint.

Training checkpoints hold optimizer and data state under Lightning's names; users and
``from_pretrained`` want the released Keye-VL layout (DESIGN §7) plus the processor files. The
LightningModule class and its arguments are read back from the checkpoint itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (FSDP2) checkpoint folder; consolidate it first with "
            "`python -m torch.distributed.checkpoint.format_utils dcp_to_torch {path} consolidated.ckpt`"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Rebuild the trained model from ``ckpt_path`` and save it (and its processor) to ``out``."""
    from keye_train.data.encode import ProcessorEncoder
    from keye_train.training.module import MODULE_CLASS_KEY, module_class

    checkpoint = load_training_checkpoint(ckpt_path)
    if MODULE_CLASS_KEY not in checkpoint:
        raise ValueError(
            f"{ckpt_path} was not written by a keye-train module (no {MODULE_CLASS_KEY!r} entry)"
        )
    # LightningCLI adds bookkeeping entries (``_class_path``, ``_instantiator``) to the arguments
    arguments = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = module_class(checkpoint[MODULE_CLASS_KEY])(**arguments)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    out = Path(out)
    data_state = next((v for k, v in checkpoint.items() if k.endswith("KeyeDataModule")), {}) or {}
    if "processor_options" in data_state and hasattr(module.model, "mlp_AR"):  # a Keye-VL model
        encoder = ProcessorEncoder.build(data_state["processor"], **data_state["processor_options"])
        module.model.save_pretrained(out, processor=encoder.processor)
    else:
        module.model.save_pretrained(out)
    return out
