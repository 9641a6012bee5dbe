"""LearningRateMonitor: each optimizer's learning rates, logged every log step."""

from __future__ import annotations

from typing import Any

from dream_trainer.callbacks._common import completes_step
from dream_trainer.trainer import Callback, LoggerMixin


class LearningRateMonitor(Callback[LoggerMixin]):
    """Logs the learning rate of every optimizer's parameter groups every log step.

    Runs on the steps where the trainer logs its training metrics (every
    ``logging_parameters.log_every_n_steps``), through ``trainer.log_dict``, with the same
    step number. Keys: ``lr/<optimizer>`` for an optimizer with one parameter group, else
    ``lr/<optimizer>/group<i>`` for each group. The value is the rate the step used: it is read
    before that step's scheduler update.
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] | None = None

    def learning_rates(self) -> dict[str, float]:
        """The current rates under the keys this callback logs."""
        rates: dict[str, float] = {}
        for name, optimizer in self.trainer.named_optimizers().items():
            groups = optimizer.param_groups
            for index, group in enumerate(groups):
                key = f"lr/{name}" if len(groups) == 1 else f"lr/{name}/group{index}"
                rates[key] = float(group["lr"])  # a tensor for some capturable optimizers
        return rates

    def pre_train_step(self, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        step = self.trainer.global_step + 1  # the step this micro-batch belongs to, 1-based
        if every and completes_step(self.trainer) and step % every == 0:
            self._pending = self.learning_rates()

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        if self._pending is not None and completes_step(self.trainer):
            rates, self._pending = self._pending, None
            self.trainer.log_dict(rates, self.trainer.global_step)
