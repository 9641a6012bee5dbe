"""A frozen model beside a trained one: not wrapped for gradient sync, and trains like one process."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from dream_trainer.configs import DeviceParameters, LoggingParameters
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLP, MLPTrainer, full_state, mlp_config


class DistillTrainer(MLPTrainer):
    """Trains ``model`` on the targets shifted by a frozen ``teacher``'s outputs."""

    def configure_models(self) -> None:
        self.teacher = MLP()
        self.teacher.requires_grad_(False)
        self.model = MLP()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.model(batch["x"]), batch["y"] + self.teacher(batch["x"]))

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def distill(device_parameters: DeviceParameters) -> dict[str, Any]:
    config = mlp_config(
        device_parameters,
        LoggingParameters(backends=[], log_every_n_steps=1),
        training={"n_epochs": 1},  # 16 samples in batches of 4: 4 steps
    )
    trainer = DistillTrainer(config)
    trainer.losses = []
    trainer.fit()
    teacher = list(trainer.teacher.parameters())
    return {
        "losses": trainer.losses,
        "model": full_state(trainer.model),
        "teacher": full_state(trainer.teacher),
        "teacher_kinds": {type(p).__name__ for p in teacher},
        "model_kinds": {type(p).__name__ for p in trainer.model.parameters()},
        "teacher_grads": [p.grad is not None for p in teacher],
        # replicate and fully_shard swap a module's class for a subclass of their own
        "teacher_class": type(trainer.teacher).__name__,
        "model_class": type(trainer.model).__name__,
    }


@functools.cache
def one_process() -> dict[str, Any]:
    (result,) = run_on_ranks(distill, 1, DeviceParameters.SINGLE_DEVICE())
    assert len(result["losses"]) == 4
    return result


def assert_trains_like_one_process(results: list[dict[str, Any]]) -> None:
    reference = one_process()
    for result in results:
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0
        )
        for name, value in result["model"].items():
            torch.testing.assert_close(value, reference["model"][name], rtol=0, atol=1e-6)
        for name, value in result["teacher"].items():  # frozen: exactly as initialized
            torch.testing.assert_close(value, reference["teacher"][name], rtol=0, atol=0)


def test_ddp_leaves_a_frozen_model_unwrapped():
    results = run_on_ranks(distill, 2, DeviceParameters.DDP(), timeout=300)
    assert_trains_like_one_process(results)
    for result in results:
        assert result["teacher_class"] == "MLP" and result["teacher_kinds"] == {"Parameter"}
        assert result["model_class"] != "MLP", result["model_class"]  # replicated
        assert not any(result["teacher_grads"])


def test_fsdp_shards_a_frozen_model_without_gradients():
    results = run_on_ranks(distill, 2, DeviceParameters.FSDP(), timeout=300)
    assert_trains_like_one_process(results)
    for result in results:
        assert result["teacher_kinds"] == {"DTensor"}  # sharded for memory
        assert result["teacher_class"] != "MLP"
        assert not any(result["teacher_grads"])
