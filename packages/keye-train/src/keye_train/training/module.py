"""LightningModules, one per kind of objective (DESIGN §8): next-token LM loss for stages 0-3, the DSA
dense warm-up (indexer only, KL to the dense attention) and DSA sparse adaptation (all weights, LM loss
plus the sparse KL). Freezing, optimizer, schedule, clipping, activation checkpointing and FSDP2/DDP
are configuration of the same module, so each stage is a YAML file and not a new class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from keye_train.training import losses, parallel
from keye_train.training.optim import OptimizerConfig, build_optimizer

MODULE_CLASS_KEY = "keye_module_class"


@dataclass
class ModelConfig:
    """Which model to train: a preset (``tiny``, ``keye-vl-2.0-30b-a3b``) or a checkpoint folder.

    ``architecture`` is ``keye-vl`` (vision tower + projector + decoder) or ``decoder`` (the text
    decoder alone); ``overrides`` replace config fields of the preset (or, for Keye-VL, of the
    checkpoint's config, e.g. adding ``sa_config`` before the DSA warm-up).
    """

    preset: str | None = "tiny"
    pretrained: str | None = None
    architecture: str = "keye-vl"
    overrides: dict[str, Any] = field(default_factory=dict)


def build_model(config: ModelConfig) -> nn.Module:
    if config.architecture == "keye-vl":
        from keye_train.config import KeyeVLConfig
        from keye_train.modeling import KeyeVLForConditionalGeneration as cls

        config_cls: Any = KeyeVLConfig
    elif config.architecture == "decoder":
        from keye_moe import DecoderConfig as config_cls
        from keye_moe import KeyeMoeForCausalLM as cls
    else:
        raise ValueError(f"model.architecture must be 'keye-vl' or 'decoder'; got {config.architecture!r}")
    if config.pretrained:
        if config.overrides:
            raise ValueError(
                "model.overrides apply to a preset; a pretrained checkpoint keeps its config.json"
            )
        return cls.from_pretrained(config.pretrained)
    if not config.preset:
        raise ValueError("model needs a preset or a pretrained checkpoint folder")
    return cls(config_cls.preset(config.preset, **config.overrides))


def indexers(model: nn.Module) -> list[nn.Module]:
    """The DSA indexers mounted in ``model`` (found by the name DESIGN §7 gives them)."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "sa_indexer"]


def set_dsa_mode(model: nn.Module, mode: str) -> None:
    """Switch every DSA indexer (``off`` | ``dense_warmup`` | ``sparse``) through keye-dsa; a model
    without indexers is fine for ``off`` and an error otherwise."""
    if not indexers(model):
        if mode == "off":
            return
        raise ValueError(
            f"DSA mode {mode!r} needs a model with DSA indexers (set sa_config in the model config)"
        )
    import keye_dsa

    keye_dsa.set_dsa_mode(model, mode)


class KeyeLMTraining(L.LightningModule):
    """Next-token loss on labelled tokens (stages 0-3); see ``trainable`` for what is frozen.

    Args:
        model: what to build or load.
        trainable: fnmatch patterns of parameter names to train (``["*"]``: everything); the rest is
            frozen and stays bit-identical.
        optimizer: AdamW and schedule settings.
        grad_clip: global gradient-norm clip (None: off); works under DDP and FSDP2 (DTensor norms).
        activation_checkpointing: recompute every block in the backward pass.
        aux_loss_coef: weight of the router load-balancing loss (None: the model config's value).
        fsdp_param_dtype: FSDP2 parameter dtype for compute (``bfloat16``; None keeps fp32).
        max_new_tokens: reply length limit of ``keye-train predict``.
    """

    dsa_mode = "off"  # stages 0-3 attend densely; the indexers (if any) wait for the DSA stages

    def __init__(
        self,
        model: ModelConfig | None = None,
        trainable: list[str] | None = None,
        optimizer: OptimizerConfig | None = None,
        grad_clip: float | None = 1.0,
        activation_checkpointing: bool = False,
        aux_loss_coef: float | None = None,
        fsdp_param_dtype: str | None = None,
        max_new_tokens: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters()
        # plain dicts too: that is how checkpoints store the arguments for `keye-train export`
        self.model_config = ModelConfig(**model) if isinstance(model, dict) else model or ModelConfig()
        self.trainable = list(trainable) if trainable is not None else self.default_trainable()
        self.optimizer_config = (
            OptimizerConfig(**optimizer) if isinstance(optimizer, dict) else optimizer or OptimizerConfig()
        )
        self.grad_clip = grad_clip
        self.activation_checkpointing = activation_checkpointing
        self.aux_loss_coef = aux_loss_coef
        self.fsdp_param_dtype = getattr(torch, fsdp_param_dtype) if fsdp_param_dtype else None
        self.max_new_tokens = max_new_tokens
        self.model: nn.Module | None = None

    def default_trainable(self) -> list[str]:
        return ["*"]

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        # built on the CPU whatever the strategy, so a seed gives the same weights on every device count
        # (Lightning then moves or shards it); from_pretrained hands back eval mode
        with torch.device("cpu"):
            model = build_model(self.model_config).train()
        set_dsa_mode(model, self.dsa_mode)
        parallel.freeze(model, self.trainable)  # the patterns decide, not set_dsa_mode's defaults
        if self.dsa_mode == "off":  # unused indexers must not look trainable (DDP would wait for them)
            for indexer in indexers(model):
                indexer.requires_grad_(False)
        if self.activation_checkpointing:
            parallel.apply_activation_checkpointing(model)
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            parallel.apply_fsdp(model, mesh["data_parallel"], param_dtype=self.fsdp_param_dtype)
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in batch.items() if k in self._model_inputs()}
        positions = inputs.get("position_ids")
        if self.model_config.architecture == "decoder" and positions is not None and positions.dim() == 3:
            inputs["position_ids"] = positions[0]  # text only: the three M-RoPE rows are equal
        return self.model(**inputs)

    def _model_inputs(self) -> tuple[str, ...]:
        common = ("input_ids", "position_ids", "cu_seqlens", "attention_mask")
        if self.model_config.architecture == "keye-vl":
            return (*common, "pixel_values", "grid_thw")
        return common

    # ------------------------------------------------------------------ objective
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Named loss terms; ``loss`` is what is optimized."""
        return self.lm_terms(self(batch), batch)

    def lm_terms(self, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Next-token loss as a token mean over every rank, plus the weighted router aux loss."""
        total, count = losses.shifted_ce_sum(out.logits, batch["labels"])
        denominator = max(losses.global_sum(float(count), total.device), 1.0)
        # DDP and FSDP average gradients over ranks: scale back so the result is a global token mean
        lm = total * losses.data_parallel_size() / denominator
        # what is logged is the global token mean itself, the same number on every rank
        self._reported = {"lm_loss": losses.global_sum(float(total.detach()), total.device) / denominator}
        terms = {"lm_loss": lm, "loss": lm}
        aux = getattr(out, "aux_loss", None)
        coef = self.aux_loss_coef if self.aux_loss_coef is not None else self._config_aux_coef()
        if aux is not None and coef:
            terms["aux_loss"] = aux
            terms["loss"] = lm + coef * aux
        terms["tokens"] = torch.tensor(float(count))
        return terms

    def _config_aux_coef(self) -> float:
        config = getattr(self.model, "config", None)
        text = getattr(config, "text_config", config)
        return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)

    def _step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        if not batch.get("num_samples", 1):  # every record of this batch failed to decode
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        self._reported = {}
        terms = self.compute_losses(batch)
        for name, value in terms.items():
            value = self._reported.get(name, value.detach().float())
            reduce = "sum" if name == "tokens" else "mean"
            train = split == "train"
            self.log(
                f"{split}/{name}", value, prog_bar=name == "loss", sync_dist=not train,
                on_step=train, on_epoch=not train, batch_size=1, reduce_fx=reduce,
            )  # fmt: skip
        return terms["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Greedy replies to the data module's ``predict`` prompts: ``{where, reply, reference}``."""
        if not batch.get("num_samples"):
            return []
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self.model_config.architecture == "keye-vl":
            inputs |= {k: batch[k] for k in ("pixel_values", "grid_thw") if k in batch}
        new = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        decode = self.trainer.datamodule.encoder.decode
        return [
            {"where": where, "reply": decode(row), "reference": reference}
            for where, row, reference in zip(batch["where"], new, batch["reference"])
        ]

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        optimizer, scheduler = build_optimizer(named, self.optimizer_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_clip is None:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[MODULE_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"


class DSAWarmupTraining(KeyeLMTraining):
    """DSA dense warm-up: only the indexers train, toward the decoder's dense attention (KL loss);
    the decoder is frozen and attends densely, so its outputs do not change."""

    dsa_mode = "dense_warmup"

    def default_trainable(self) -> list[str]:
        return ["*.sa_indexer.*"]

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch)
        kl = indexer_kl(out)
        return {"indexer_kl": kl, "loss": kl}


class DSASparseTraining(KeyeLMTraining):
    """DSA sparse adaptation: everything trains under sparse attention; LM loss plus the sparse KL,
    with the indexer's input detached so each loss reaches only its own weights."""

    dsa_mode = "sparse"

    def __init__(self, *args: Any, kl_coef: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kl_coef = kl_coef

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self(batch)
        terms = self.lm_terms(out, batch)
        terms["indexer_kl"] = indexer_kl(out)
        terms["loss"] = terms["loss"] + self.kl_coef * terms["indexer_kl"]
        return terms


def indexer_kl(output: Any) -> torch.Tensor:
    """The indexer KL summed over layers, as the DSA backend reports it in the model output."""
    found = getattr(output, "aux_losses", None) or {}
    if "indexer_kl" not in found:
        raise RuntimeError(
            "the model output carries no 'indexer_kl' loss: is DSA on (sa_config) and keye-dsa installed?"
        )
    return found["indexer_kl"]


def module_class(path: str) -> type[KeyeLMTraining]:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
