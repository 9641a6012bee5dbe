"""The trainer: BaseTrainer (loop), setup mixins, callbacks, and DreamTrainer."""

from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.callback import Callback
from dream_trainer.trainer.dream_trainer import DreamTrainer
from dream_trainer.trainer.mixins import (
    CheckpointMixin,
    DataLoaderSetupMixin,
    EvalMetricMixin,
    LoggerMixin,
    ModelSetupMixin,
    OptimizerAndSchedulerSetupMixin,
    PredictMixin,
    SetupMixin,
)
from dream_trainer.trainer.samplers import GlobalOrderSampler
from dream_trainer.trainer.stepping import NonFiniteGradientError

__all__ = [
    "BaseTrainer",
    "Callback",
    "CheckpointMixin",
    "DataLoaderSetupMixin",
    "DreamTrainer",
    "EvalMetricMixin",
    "GlobalOrderSampler",
    "LoggerMixin",
    "ModelSetupMixin",
    "NonFiniteGradientError",
    "OptimizerAndSchedulerSetupMixin",
    "PredictMixin",
    "SetupMixin",
]
