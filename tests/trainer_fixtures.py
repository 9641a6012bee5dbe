"""Small models, data and trainers shared by the trainer setup/callback/lifecycle/logging tests.

Everything here is deterministic given the seed, tiny (a few hundred parameters) and importable
by qualified name so it can run on the ranks of ``tests.multirank``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import (
    ConfigModel,
    DeviceParameters,
    LoggingParameters,
    ModelSetupConfigMixin,
    TrainerConfig,
    TrainingParameters,
)
from dream_trainer.parallel import colwise_parallel, rowwise_parallel

IN, HIDDEN, OUT = 4, 8, 3


class MLP(nn.Module):
    """Two linear layers kept in ``self.layers`` (a ModuleList: its blocks are declared)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.relu(self.layers[0](x)))

    def init_weights(self) -> None:
        for param in self.parameters():
            nn.init.normal_(param, std=0.5)


class PlanMLP(MLP):
    """The MLP with a tensor-parallel plan: first layer column-wise, second row-wise."""

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        return {"layers.0": colwise_parallel(), "layers.1": rowwise_parallel()}


class FlatMLP(nn.Module):
    """An MLP without any ModuleList/ModuleDict: it declares no blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(IN, HIDDEN)
        self.second = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.relu(self.first(x)))


class RegressionData(Dataset[dict[str, torch.Tensor]]):
    """``n`` fixed random (x, y, label) samples; ``label`` is a class in ``range(OUT)``."""

    def __init__(self, n: int, seed: int = 99) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.randn(n, OUT, generator=g)
        self.label = torch.randint(0, OUT, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "label": self.label[i]}


class MLPFields(ConfigModel):
    """Data and optimizer sizes of the MLP runs; batch sizes are per run, not per rank."""

    train_size: int = 16
    val_size: int = 8
    global_batch: int = 4
    val_global_batch: int = 4
    lr: float = 0.1
    plan: bool = False


class MLPConfig(MLPFields, DreamTrainerConfig):
    """Config of :class:`MLPTrainer`."""


class LeanMLPConfig(MLPFields, ModelSetupConfigMixin, TrainerConfig):
    """Config of a trainer without logger or metrics: only what SetupMixin reads."""


def mlp_config(
    device_parameters: DeviceParameters | None = None,
    logging: LoggingParameters | None = None,
    **fields: Any,
) -> MLPConfig:
    """A config with no metric backends unless given, one epoch of 2 steps unless overridden."""
    training = fields.pop("training", {"n_epochs": 1, "train_steps_per_epoch": 2})
    return MLPConfig(
        seed=3,
        device_parameters=device_parameters or DeviceParameters.SINGLE_DEVICE(),
        training_parameters=TrainingParameters(**training),
        logging_parameters=logging or LoggingParameters(backends=[]),
        **fields,
    )


class MLPHooks:
    """User hooks of an MSE regression of ``y`` from ``x``; each data-parallel rank its samples.

    Mixed into a trainer that has :class:`~dream_trainer.trainer.SetupMixin`.
    """

    config: Any
    world: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def configure_models(self) -> None:
        self.model = PlanMLP() if self.config.plan else MLP()

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        cfg, dp = self.config, self.world.dp_size
        sampler = self.distributed_sampler  # type: ignore[attr-defined]
        train = RegressionData(cfg.train_size, seed=1)
        val = RegressionData(cfg.val_size, seed=2)
        return (
            DataLoader(
                train,
                batch_size=cfg.global_batch // dp,
                sampler=sampler(train, shuffle=False),
            ),
            DataLoader(
                val, batch_size=cfg.val_global_batch // dp, sampler=sampler(val, shuffle=False)
            ),
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.model(batch["x"]), batch["y"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss = self.loss(batch)
        self.backward(loss)  # type: ignore[attr-defined]
        if not self.is_accumulating_gradients:  # type: ignore[attr-defined]
            self.step(self.optimizer)  # type: ignore[attr-defined]
        return {"loss": loss.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return {"val_loss": self.loss(batch)}


class MLPTrainer(MLPHooks, DreamTrainer):
    """The MLP regression on the full DreamTrainer (logger and metrics mixins included)."""

    config: MLPConfig


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full (gathered) CPU tensor, keyed by its name without wrappers."""
    from dream_trainer.parallel.materialize import canonical_name

    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[canonical_name(name)] = value.detach().cpu().clone()
    return out


def caught(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn``; return ``{"error": type name, "message": str}`` or ``{"value": result}``.

    Used on ranks so an expected failure does not kill the rank pool.
    """
    try:
        return {"value": fn(*args, **kwargs)}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
