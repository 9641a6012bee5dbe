"""DreamTrainer: the base loop with every setup mixin, metrics and logging."""

from __future__ import annotations

from dream_trainer.configs import DreamTrainerConfig
from dream_trainer.trainer.mixins import CheckpointMixin, EvalMetricMixin, LoggerMixin, SetupMixin


class DreamTrainer(CheckpointMixin, LoggerMixin, EvalMetricMixin, SetupMixin):
    """Subclass it, implement the ``configure_*`` hooks and ``training_step``, call ``fit()``."""

    config: DreamTrainerConfig  # type: ignore[assignment]
