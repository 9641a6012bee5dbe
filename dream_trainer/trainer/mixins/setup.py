"""SetupMixin: models, optimizers and schedulers, and dataloaders, set up in that order."""

from __future__ import annotations

from dream_trainer.trainer.mixins.dataloaders import DataLoaderSetupMixin
from dream_trainer.trainer.mixins.models import ModelSetupMixin
from dream_trainer.trainer.mixins.optimizers import OptimizerAndSchedulerSetupMixin


class SetupMixin(DataLoaderSetupMixin, OptimizerAndSchedulerSetupMixin, ModelSetupMixin):
    """Each ``setup`` calls ``super().setup()`` first, so models come first, dataloaders last."""
