"""Trainer mixins: one per concern, composed into DreamTrainer."""

from dream_trainer.trainer.mixins.checkpoints import CheckpointMixin
from dream_trainer.trainer.mixins.dataloaders import DataLoaderSetupMixin
from dream_trainer.trainer.mixins.eval_metrics import EvalMetricMixin
from dream_trainer.trainer.mixins.loggers import LoggerMixin
from dream_trainer.trainer.mixins.models import ModelSetupMixin
from dream_trainer.trainer.mixins.optimizers import OptimizerAndSchedulerSetupMixin
from dream_trainer.trainer.mixins.predicting import PredictMixin
from dream_trainer.trainer.mixins.setup import SetupMixin

__all__ = [
    "CheckpointMixin",
    "DataLoaderSetupMixin",
    "EvalMetricMixin",
    "LoggerMixin",
    "ModelSetupMixin",
    "OptimizerAndSchedulerSetupMixin",
    "PredictMixin",
    "SetupMixin",
]
