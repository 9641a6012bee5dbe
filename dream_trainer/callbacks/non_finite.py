"""NonFiniteGradMonitor: watch the steps ``on_non_finite_grad="skip"`` skips, and stop a run
that keeps skipping."""

from __future__ import annotations

from typing import Any

from dream_trainer.callbacks._common import check_int, completes_step, is_global_zero, logger
from dream_trainer.trainer import BaseTrainer, Callback, NonFiniteGradientError


class NonFiniteGradMonitor(Callback[BaseTrainer]):
    """Reports optimizer steps skipped for a NaN/inf gradient norm and fails a run that keeps
    skipping.

    For ``training_parameters.on_non_finite_grad="skip"`` (with the default ``"error"`` the
    trainer raises at the first such step itself). A step counts as skipped when any
    optimizer skipped its update in it; the gradient norm is global, so every rank skips the
    same steps and reaches the same decisions. The callback:

    * warns (rank 0) on each skipped step, naming it (steps are numbered from 0, as in the
      trainer's own messages);
    * raises :class:`~dream_trainer.trainer.NonFiniteGradientError` naming the steps after
      ``max_consecutive_skips`` skipped steps in a row.

    The trainer itself, with or without this callback, logs the count so far as
    ``train/skipped_steps`` on every log step and warns "skipped X of Y optimizer steps" at the
    end of ``fit``. Counts survive a resume through its state.
    """

    def __init__(self, max_consecutive_skips: int = 10) -> None:
        self.max_consecutive_skips = check_int(
            "NonFiniteGradMonitor",
            "max_consecutive_skips",
            max_consecutive_skips,
            1,
            "give the number of skipped steps in a row that should stop the run, e.g. 10",
        )
        self.skipped = 0
        """Skipped optimizer steps seen (this run and the runs it resumed)."""
        self.steps = 0
        """Optimizer steps seen (this run and the runs it resumed)."""
        self.streak: list[int] = []
        """The steps of the current run of consecutive skips."""
        self._trainer_count = 0

    def pre_fit(self) -> None:
        self._trainer_count = self.trainer.skipped_steps

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        if not completes_step(self.trainer):
            return
        trainer = self.trainer
        step = trainer.global_step - 1  # the step just completed, numbered from 0
        self.steps += 1
        if trainer.skipped_steps == self._trainer_count:
            self.streak = []
        else:
            self._trainer_count = trainer.skipped_steps
            self.skipped += 1
            self.streak.append(step)
            if is_global_zero(trainer):
                logger.warning(
                    "step %d was skipped: non-finite gradient norm (%d in a row, %d of %d steps "
                    "so far; the run stops after %d in a row)",
                    step,
                    len(self.streak),
                    self.skipped,
                    self.steps,
                    self.max_consecutive_skips,
                )
            if len(self.streak) >= self.max_consecutive_skips:
                raise NonFiniteGradientError(
                    f"{len(self.streak)} optimizer steps in a row had a non-finite gradient norm "
                    f"and were skipped (steps {_ranges(self.streak)}; {self.skipped} of "
                    f"{self.steps} steps skipped in all), so NonFiniteGradMonitor("
                    f"max_consecutive_skips={self.max_consecutive_skips}) stopped the run. Lower "
                    "the learning rate, set gradient_clip_val, check the inputs for NaN/inf, or "
                    "raise max_consecutive_skips."
                )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "steps": self.steps, "streak": list(self.streak)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.steps = int(state_dict.get("steps", 0))
        self.streak = [int(s) for s in state_dict.get("streak", [])]


def _ranges(steps: list[int]) -> str:
    """``[3, 4, 5]`` -> ``"3-5"`` (a streak is consecutive); one step -> ``"3"``."""
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
