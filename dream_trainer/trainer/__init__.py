"""The trainer: BaseTrainer (loop), setup mixins, callbacks, and DreamTrainer."""

from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.callback import Callback
from dream_trainer.trainer.dream_trainer import DreamTrainer
from dream_trainer.trainer.mixins import (
    DataLoaderSetupMixin,
    EvalMetricMixin,
    LoggerMixin,
    ModelSetupMixin,
    OptimizerAndSchedulerSetupMixin,
    SetupMixin,
)
from dream_trainer.trainer.stepping import NonFiniteGradientError

__all__ = [
    "BaseTrainer",
    "Callback",
    "DataLoaderSetupMixin",
    "DreamTrainer",
    "EvalMetricMixin",
    "LoggerMixin",
    "ModelSetupMixin",
    "NonFiniteGradientError",
    "OptimizerAndSchedulerSetupMixin",
    "SetupMixin",
]
