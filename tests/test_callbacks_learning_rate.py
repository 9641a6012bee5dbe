"""LearningRateMonitor: the rate each logged step used, per optimizer and parameter group."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from dream_trainer.callbacks import LearningRateMonitor
from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer import Callback, SetupMixin
from tests.trainer_fixtures import MLPTrainer, mlp_config


class ScheduledTrainer(MLPTrainer):
    """Two optimizers: one with two parameter groups, each with its own decaying schedule."""

    def configure_optimizers(self) -> None:
        first, second = self.model.layers
        self.optimizer = torch.optim.SGD(
            [{"params": first.parameters()}, {"params": [second.weight], "lr": 0.05}], lr=0.1
        )
        self.bias_optimizer = torch.optim.SGD([second.bias], lr=0.01)

    def configure_schedulers(self) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 0.5**s)
        self.bias_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.bias_optimizer, lambda s: 1.0 + s
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss = self.loss(batch)
        self.backward(loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
            self.step(self.bias_optimizer)
        return {"loss": loss.detach()}

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged.append((step, dict(metrics)))


class UsedRates(Callback):
    """The rate of every group just before each optimizer update: what the step used."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def pre_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.rates.append([g["lr"] for g in optimizer.param_groups])


def test_rates_the_steps_used_are_logged_every_log_step_per_optimizer_and_group(tmp_path):
    config = mlp_config(
        logging=LoggingParameters(backends=["jsonl"], log_every_n_steps=2),
        training={"n_epochs": 1, "train_steps_per_epoch": 4, "gradient_accumulation_steps": 2},
        train_size=16,
        global_batch=2,
        run_dir=str(tmp_path),
    )
    used = UsedRates()
    trainer = ScheduledTrainer(config, callbacks=[LearningRateMonitor(), used])
    trainer.logged = []
    trainer.fit()
    # 4 steps x 2 optimizers; the rates of step s (1-based) are used[2 (s - 1)] and [2 s - 1].
    assert len(used.rates) == 8
    logged = [(step, m) for step, m in trainer.logged if any(k.startswith("lr/") for k in m)]
    expected = []
    for step in (2, 4):
        (main_first, main_second), (bias,) = used.rates[2 * step - 2], used.rates[2 * step - 1]
        expected.append(
            (
                step,
                {
                    "lr/optimizer/group0": main_first,
                    "lr/optimizer/group1": main_second,
                    "lr/bias_optimizer": bias,
                },
            )
        )
    assert logged == expected
    # The schedules moved between the logged steps, so a rate read after the update would differ.
    assert expected[0][1]["lr/optimizer/group0"] == pytest.approx(0.1 * 0.5)
    assert expected[1][1]["lr/optimizer/group0"] == pytest.approx(0.1 * 0.5**3)
    assert expected[1][1]["lr/bias_optimizer"] == pytest.approx(0.01 * 4)
    # Through the trainer's sinks: the JSONL file has them at the same steps as train/loss.
    records = [
        json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    by_step = {r["step"]: r for r in records if "lr/bias_optimizer" in r}
    assert sorted(by_step) == [2, 4]
    assert by_step[4]["lr/optimizer/group1"] == pytest.approx(0.05 * 0.5**3)
    assert {r["step"] for r in records if "train/loss" in r} == {2, 4}


def test_a_trainer_without_logging_is_refused_naming_the_logger_mixin():
    class Lean(SetupMixin):
        pass

    with pytest.raises(
        TypeError, match="LearningRateMonitor needs a trainer that is a LoggerMixin"
    ):
        Lean(mlp_config(), callbacks=[LearningRateMonitor()])
