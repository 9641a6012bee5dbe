"""EarlyStopping: end training when a validation metric stops improving."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist

from dream_trainer.callbacks._common import check_float, check_int, is_global_zero, logger
from dream_trainer.trainer import BaseTrainer, Callback


class EarlyStopping(Callback[BaseTrainer]):
    """Stops ``fit()`` (normally) when ``monitor`` has not improved for ``patience`` validations.

    ``monitor`` is a key of the validation results, i.e. a name ``validation_step`` returns
    (the trainer adds no prefix: ``{"val/loss": ...}`` is monitored as ``"val/loss"``) or one
    from ``collect_validation_metrics``. A validation improves on the best value so far when it
    is lower by more than ``min_delta`` (``mode="min"``) or higher by more than ``min_delta``
    (``mode="max"``); NaN never improves. Once ``patience`` validations in a row have not
    improved (for ``patience`` 0 or 1: at the first), the callback calls
    ``trainer.request_stop``: the current step finishes, the
    end-of-fit checkpoint is written and ``post_fit`` runs. The sanity validation before
    training is ignored.

    The results are already averaged over the data-parallel ranks; the callback still takes
    rank 0's value (one tiny broadcast per validation), so every rank updates the same state
    and stops at the same step. ``best``, ``wait`` and ``stopped_step`` are in its state.
    """

    def __init__(
        self,
        monitor: str,
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"EarlyStopping(monitor={monitor!r}): give the validation metric to watch, a key "
                "that validation_step returns, e.g. 'val/loss'"
            )
        if mode not in ("min", "max"):
            raise ValueError(
                f"EarlyStopping(mode={mode!r}): mode must be 'min' (lower is better, e.g. a loss) "
                "or 'max' (higher is better, e.g. an accuracy)"
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = check_int(
            "EarlyStopping",
            "patience",
            patience,
            0,
            "give how many validations in a row without improvement stop the run, e.g. 3",
        )
        self.min_delta = check_float("EarlyStopping", "min_delta", min_delta)
        if self.min_delta < 0:
            raise ValueError(
                f"EarlyStopping(min_delta={min_delta!r}): min_delta must be >= 0 (the margin "
                "by which a value must beat the best to count as an improvement)"
            )
        self.best: float | None = None
        """The best value seen so far (``None`` before the first finite value)."""
        self.wait = 0
        """Validations in a row without improvement."""
        self.stopped_step: int | None = None
        """The global step at which the callback asked the trainer to stop."""
        self._sanity = False

    def pre_fit(self) -> None:
        self._sanity = True  # the sanity validation, if any, runs between pre_fit and training

    def pre_epoch(self) -> None:
        self._sanity = False

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def post_validation_epoch(self, results: dict[str, float]) -> None:
        if self._sanity:
            return
        if self.monitor not in results:
            raise KeyError(
                f"EarlyStopping(monitor={self.monitor!r}): validation returned no such metric; it "
                f"returned {sorted(results)}. Monitor one of those (validation_step's keys are "
                "used as they are, with no prefix)"
            )
        value = self._agreed(float(results[self.monitor]))
        trainer = self.trainer
        if self.improves(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        self.stopped_step = trainer.global_step
        reason = (
            f"EarlyStopping: {self.monitor} did not improve for {self.wait} validations in a "
            f"row (best {self.best}, last {value}, mode={self.mode!r}, min_delta={self.min_delta}"
            f", patience={self.patience})"
        )
        if is_global_zero(trainer):
            logger.info("%s; stopping after step %d", reason, trainer.global_step)
        trainer.request_stop(reason)

    def _agreed(self, value: float) -> float:
        """Rank 0's value on every rank."""
        world = self.trainer.world
        if world.world_size == 1:
            return value
        packed = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(packed, src=0, group=world.cpu_group)
        return float(packed.item())

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state_dict.get("wait", 0))
        stopped = state_dict.get("stopped_step")
        self.stopped_step = None if stopped is None else int(stopped)
