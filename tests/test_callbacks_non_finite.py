"""NonFiniteGradMonitor: warns on each skipped step, logs the count, fails after N in a row."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dream_trainer.callbacks import NonFiniteGradMonitor
from dream_trainer.configs import DeviceParameters, LoggingParameters
from tests.multirank import run_on_ranks
from tests.test_warnings_and_conventions import recorded_warnings
from tests.trainer_fixtures import MLPTrainer, mlp_config


class NaNTrainer(MLPTrainer):
    """Feeds NaN inputs on ``nan_steps`` (0-based global steps), on rank ``nan_rank`` only."""

    nan_steps: set[int] = set()
    nan_rank = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.global_step in self.nan_steps and self.world.rank == self.nan_rank:
            batch = {**batch, "x": batch["x"] * float("nan")}
        return super().training_step(batch, batch_idx)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/skipped_steps" in metrics:
            self.skip_counts.append((step, metrics["train/skipped_steps"]))


def run(nan_steps: list[int], max_consecutive: int, steps: int = 10) -> dict[str, Any]:
    layout = DeviceParameters.DDP() if torch.distributed.get_world_size() > 1 else None
    config = mlp_config(
        layout,
        logging=LoggingParameters(backends=[], log_every_n_steps=1),
        training={"n_epochs": 1, "max_steps": steps, "on_non_finite_grad": "skip"},
        train_size=40,
        global_batch=4,
    )
    monitor = NonFiniteGradMonitor(max_consecutive_skips=max_consecutive)
    trainer = NaNTrainer(config, callbacks=[monitor])
    trainer.nan_steps, trainer.nan_rank = set(nan_steps), 1 if layout else 0
    trainer.skip_counts = []
    error = None
    with recorded_warnings() as warnings:
        try:
            trainer.fit()
        except Exception as caught:
            error = f"{type(caught).__name__}: {caught}"
    return {
        "error": error,
        "step": trainer.global_step,
        "skip_counts": trainer.skip_counts,
        "warnings": [w for w in warnings if "non-finite gradient norm" in w],
        "ends": [w for w in warnings if w.startswith("skipped ")],
        "state": monitor.state_dict(),
    }


def test_a_run_that_keeps_skipping_fails_after_n_in_a_row_on_every_rank():
    # Only rank 1 sees NaN; DDP spreads it, so both ranks skip the same steps and both fail.
    results = run_on_ranks(run, 2, [1, 3, 4, 5, 6, 7, 8, 9], 4)
    for rank, result in enumerate(results):
        assert result["error"] is not None, rank
        assert result["error"].startswith("NonFiniteGradientError: 4 optimizer steps in a row")
        assert "(steps 3-6; 5 of 7 steps skipped in all)" in result["error"]
        assert "max_consecutive_skips=4" in result["error"]
        assert result["step"] == 7  # failed after completing (skipping) step 6
        # The count as logged on every log step, up to the last step before the failure.
        assert result["skip_counts"] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3), (6, 4)]
        assert result["state"] == {"skipped": 5, "steps": 7, "streak": [3, 4, 5, 6]}
    warned = results[0]["warnings"]  # rank 0 warns, naming each skipped step
    assert [w.split(" was skipped")[0] for w in warned] == [f"step {s}" for s in (1, 3, 4, 5, 6)]
    assert "4 in a row, 5 of 7 steps so far; the run stops after 4 in a row" in warned[-1]
    assert results[1]["warnings"] == []


def test_a_run_with_scattered_skips_ends_normally_and_reports_the_total():
    (result,) = run_on_ranks(run, 1, [2, 3, 6], 3, steps=8)
    assert result["error"] is None and result["step"] == 8
    assert result["ends"] == ["skipped 3 of 8 optimizer steps (non-finite gradient norm)"]
    counts = dict(result["skip_counts"])
    assert counts[8] == 3.0 and counts[3] == 1.0 and counts[4] == 2.0
    assert len(result["skip_counts"]) == 8  # once per step: the end of fit adds no duplicate
    assert result["state"] == {"skipped": 3, "steps": 8, "streak": []}


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"max_consecutive_skips=0\): max_consecutive_skips must be >= 1"),
        (2.5, TypeError, r"max_consecutive_skips must be an integer"),
    ],
)
def test_bad_arguments_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        NonFiniteGradMonitor(max_consecutive_skips=value)
