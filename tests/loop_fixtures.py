"""A tiny per-token MLP, its data and a trainer for the training-loop specification tests.

Everything here is deterministic given the seed, so a test can recompute what the trainer
should have done with plain torch in the pytest process (see :func:`reference_model`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.parallel import colwise_parallel, rowwise_parallel
from dream_trainer.trainer import Callback

IN, HIDDEN, CLASSES, SEQ = 4, 8, 3, 4
SEED = 5


class MLP(nn.Module):
    """Two linear layers applied to every token; TP splits the hidden dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One row per token: 2-D activations keep FSDP from seeing a view as the output.
        return self.fc2(torch.tanh(self.fc1(x.reshape(-1, IN))))

    def init_weights(self) -> None:
        for param in self.parameters():
            nn.init.normal_(param, std=0.5)

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        return {"fc1": colwise_parallel(), "fc2": rowwise_parallel()}


def reference_model(seed: int = SEED) -> MLP:
    """The initial weights every trainer layout starts from (``weight_init="full"``)."""
    model = MLP()
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def valid_tokens(i: int) -> int:
    return 1 + (7 * i // 3) % SEQ


class SequenceData(Dataset[dict[str, Any]]):
    """``n`` sequences of ``SEQ`` tokens; ``idx`` identifies the sample.

    With ``pad``, sample i keeps its first ``valid_tokens(i)`` labels and the rest are -100
    (ignored by cross-entropy), so micro-batches hold irregular numbers of valid tokens.
    """

    def __init__(self, n: int, pad: bool = False, seed: int = 99) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, SEQ, IN, generator=g)
        self.labels = torch.randint(0, CLASSES, (n, SEQ), generator=g)
        if pad:
            for i in range(n):
                self.labels[i, valid_tokens(i) :] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"idx": i, "x": self.x[i], "labels": self.labels[i]}

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return {
            "idx": torch.tensor(indices),
            "x": self.x[indices],
            "labels": self.labels[indices],
        }


class LoopConfig(DreamTrainerConfig):
    lr: float = 0.1
    dataset_size: int = 16
    batch_size: int = 2
    """Samples per micro-batch on each data-parallel rank."""
    pad: bool = False
    shuffle: bool = False
    token_normalized: bool = False


def loop_config(device_parameters: DeviceParameters | None = None, **options: Any) -> LoopConfig:
    """A config with logging to memory only; ``options`` are LoopConfig or training fields."""
    own = {k: options.pop(k) for k in list(options) if k in LoopConfig.model_fields}
    return LoopConfig(
        seed=SEED,
        device_parameters=device_parameters or DeviceParameters.SINGLE_DEVICE(),
        training_parameters=TrainingParameters(**options),
        logging_parameters={"backends": [], "log_every_n_steps": 1},
        **own,
    )


def token_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over valid tokens, and the number of valid tokens."""
    labels = batch["labels"]
    loss = F.cross_entropy(model(batch["x"]), labels.flatten(), reduction="sum")
    return loss, (labels != -100).sum()


def mean_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["labels"].flatten())


class LoopTrainer(DreamTrainer):
    """SGD on :class:`MLP`; records each micro-batch's sample ids and losses."""

    config: LoopConfig

    def configure_models(self) -> None:
        self.model = MLP()

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr)

    def make_dataset(self) -> SequenceData:
        return SequenceData(self.config.dataset_size, pad=self.config.pad)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = self.make_dataset()
        sampler = self.distributed_sampler(data, shuffle=self.config.shuffle)
        return DataLoader(data, batch_size=self.config.batch_size, sampler=sampler), None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.current_epoch, self.global_step, batch["idx"].tolist()))
        if self.config.token_normalized:
            loss, tokens = token_loss(self.model, batch)
            self.backward(loss, num_tokens=tokens)
        else:
            loss = mean_loss(self.model, batch)
            self.backward(loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss.detach()}


def full(tensor: torch.Tensor | None) -> torch.Tensor:
    """A CPU copy of the whole tensor (gathers DTensor shards: every rank must call it)."""
    assert tensor is not None, "expected a gradient"
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p) for name, p in model.named_parameters()}


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p.grad) for name, p in model.named_parameters()}


class CaptureBeforeStep(Callback[LoopTrainer]):
    """Full gradients and weights of ``trainer.model`` just before every optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def pre_optimizer_step(self, optimizer: Any) -> None:
        model = self.trainer.model
        self.grads.append(full_grads(model))
        self.weights.append(full_weights(model))


class Unsized:
    """An iterable with no ``__len__``: the loop must agree batch by batch."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


def reference_sgd(
    step_batches: list[dict[str, Any]],
    *,
    token_normalized: bool = False,
    lr: float = 0.1,
    clip: float | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """One process, plain torch: one whole batch per SGD step.

    Returns the gradients used by each step (after clipping) and the weights before each
    step, plus the final weights.
    """
    model = reference_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    grads, weights = [], []
    for batch in step_batches:
        weights.append(full_weights(model))
        if token_normalized:
            loss, tokens = token_loss(model, batch)
            (loss / tokens).backward()
        else:
            mean_loss(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        grads.append(full_grads(model))
        optimizer.step()
        optimizer.zero_grad()
    weights.append(full_weights(model))
    return grads, weights


def assert_tensors_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str
) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        try:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol)
        except AssertionError as error:
            raise AssertionError(f"{what} {name}: {error}") from None


class ScriptedTrainer(LoopTrainer):
    """LoopTrainer whose loaders, NaN injection and validation are set per rank by a test.

    Records ``events`` (train/val calls with mode flags), ``seen`` sample ids, each
    micro-batch's ``losses`` and every ``log_dict`` call in ``logged``.
    """

    train_batches: Any = None  # replaces the sampler-based train loader when set
    val_batches: Any = None
    nan_at_step: int | None = None
    nan_on_rank: int = 0

    def configure_dataloaders(self) -> tuple[Any, Any]:
        train, _ = super().configure_dataloaders()
        return (train if self.train_batches is None else self.train_batches), self.val_batches

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.events = getattr(self, "events", [])
        self.events.append(("train", self.global_step, self.model.training))
        loss = mean_loss(self.model, batch)
        if self.global_step == self.nan_at_step and self.world.rank == self.nan_on_rank:
            loss = loss * math.nan
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.current_epoch, self.global_step, batch["idx"].tolist()))
        self.losses = getattr(self, "losses", [])
        self.losses.append(loss.item())
        self.backward(loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss, "rank": self.world.rank}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        self.events = getattr(self, "events", [])
        state = (self.model.training, torch.is_grad_enabled())
        self.events.append(("val", batch_idx, self.global_step, *state))
        return {"value": batch.float().mean()}

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged = getattr(self, "logged", [])
        self.logged.append((step, dict(metrics)))


def run(params: DeviceParameters | None, attrs: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Fit a ScriptedTrainer on this rank; ``attrs`` values may be ``{"per_rank": [...]}``."""
    trainer = ScriptedTrainer(loop_config(params, **options))
    for name, value in attrs.items():
        if isinstance(value, dict) and "per_rank" in value:
            value = value["per_rank"][dist.get_rank()]
        setattr(trainer, name, value)
    start = time.monotonic()
    error = None
    try:
        trainer.fit()
    except Exception as caught:  # returned so the test can assert on it
        error = caught
    return {
        "error": error,
        "elapsed": time.monotonic() - start,
        "global_step": trainer.global_step,
        "skipped": trainer.skipped_steps,
        "seen": getattr(trainer, "seen", []),
        "events": getattr(trainer, "events", []),
        "losses": getattr(trainer, "losses", []),
        "logged": getattr(trainer, "logged", []),
        "last_train_metrics": trainer.last_train_metrics,
        "validation_results": trainer.validation_results,
        # Gathering shards is a collective: skip it after an error (peers may have stopped).
        "weights": full_weights(trainer.model) if error is None else {},
    }


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for rank, result in enumerate(results):
        assert result["error"] is None, f"rank {rank}: {result['error']!r}"
    return results


class WeightsPerStep(Callback[LoopTrainer]):
    """Full weights at the start of every micro-batch, in ``trainer.weights_per_step``."""

    def pre_train_step(self, batch: Any, batch_idx: int) -> None:
        self.trainer.weights_per_step = getattr(self.trainer, "weights_per_step", [])
        self.trainer.weights_per_step.append(full_weights(self.trainer.model))
