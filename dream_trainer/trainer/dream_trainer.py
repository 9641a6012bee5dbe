"""DreamTrainer: the base loop with every setup mixin, metrics and logging."""

from __future__ import annotations

from dream_trainer.configs import DreamTrainerConfig
from dream_trainer.trainer.mixins import (
    CheckpointMixin,
    EvalMetricMixin,
    LoggerMixin,
    PredictMixin,
    SetupMixin,
)


class DreamTrainer(CheckpointMixin, LoggerMixin, EvalMetricMixin, PredictMixin, SetupMixin):
    """Subclass it, implement the ``configure_*`` hooks and ``training_step``, call ``fit()``;
    implement ``predict_step`` and call ``predict()`` for data-parallel batch inference."""

    config: DreamTrainerConfig  # type: ignore[assignment]
