"""on_non_finite_grad="error" without a host sync per step: the norms are checked in bulk at log
steps, before checkpoints and at the end of fit (the accelerator path, forced here on CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer.stepping import NonFiniteGradientError
from tests.trainer_fixtures import MLPTrainer, mlp_config


class Deferred(MLPTrainer):
    nan_at: int | None = None
    syncs = 0

    @property
    def _defer_non_finite_check(self) -> bool:
        return True  # as on an accelerator

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.global_step == self.nan_at:
            batch = {**batch, "x": batch["x"] * float("nan")}
        return super().training_step(batch, batch_idx)

    def check_gradient_norms(self) -> None:
        self.syncs += bool(self._unchecked_norms)
        super().check_gradient_norms()


def config(tmp_path: Any) -> Any:
    return mlp_config(
        logging=LoggingParameters(backends=[], log_every_n_steps=4, performance_metrics=False),
        training={"n_epochs": 1, "max_steps": 8},
        train_size=32,
        global_batch=4,
        run_dir=str(tmp_path),
    )


def test_a_deferred_check_names_the_first_non_finite_step_at_the_next_log_step(tmp_path):
    trainer = Deferred(config(tmp_path))
    trainer.nan_at = 1
    with pytest.raises(NonFiniteGradientError, match="at step 1 on rank 0") as caught:
        trainer.fit()
    assert "found at step 4 by the deferred check: steps 1 to 3 were applied" in str(caught.value)
    assert trainer.global_step == 4  # it ran on to the log step, without a sync per step


def test_finite_runs_train_the_same_deferred_or_not_with_one_check_per_log_window(tmp_path):
    deferred = Deferred(config(tmp_path / "deferred"))
    deferred.fit()
    immediate = MLPTrainer(config(tmp_path / "immediate"))
    immediate.fit()
    assert deferred.syncs == 2  # steps 4 and 8, not one per step
    for a, b in zip(deferred.model.parameters(), immediate.model.parameters(), strict=True):
        assert torch.equal(a, b)
