"""Lightning training for every stage: objectives, optimizer and schedule, freezing, parallelism."""

from keye_train.training.module import (
    DSASparseTraining,
    DSAWarmupTraining,
    KeyeLMTraining,
    ModelConfig,
)
from keye_train.training.optim import OptimizerConfig

__all__ = ["DSASparseTraining", "DSAWarmupTraining", "KeyeLMTraining", "ModelConfig", "OptimizerConfig"]
