"""Life of a run: who destroys the process group, errors and interrupts, lean composition."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.trainer import Callback, EvalMetricMixin, LoggerMixin, SetupMixin
from tests.multirank import REPO_ROOT, run_on_ranks, run_with_fresh_ranks
from tests.trainer_fixtures import (
    MLP,
    OUT,
    FlatMLP,
    LeanMLPConfig,
    MLPHooks,
    MLPTrainer,
    RegressionData,
    full_state,
    mlp_config,
)

pytestmark = pytest.mark.multirank

# Collectives of a rank left waiting fail after this long. The raising rank's process lives on in
# the harness, so its gloo connections stay open (gloo's abort does not wake a peer blocked in a
# receive either): the train timeout is what frees the peer. Under torchrun the process exits.
TRAIN_TIMEOUT_S = 5.0


class GroupProbe(Callback):
    """Records whether the process group is up at post_setup and at on_interrupt."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def post_setup(self) -> None:
        self.seen.append(("post_setup", dist.is_initialized()))

    def on_interrupt(self) -> None:
        self.seen.append(("on_interrupt", dist.is_initialized()))


class RaisingTrainer(MLPTrainer):
    """Raises ``to_raise`` from training_step at batch 1 on the ranks in ``raise_on_ranks``."""

    raise_on_ranks: tuple[int, ...] = ()
    to_raise: type[BaseException] = RuntimeError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if batch_idx == 1 and self.world.rank in self.raise_on_ranks:
            raise self.to_raise(f"raised in training_step on rank {self.world.rank}")
        return super().training_step(batch, batch_idx)


def fit_and_report(
    to_raise: type[BaseException] | None = None, ranks: tuple[int, ...] = (), **comm: Any
) -> dict[str, Any]:
    """Fit a DDP trainer on this rank; report the outcome and the process group's state."""
    probe = GroupProbe()
    trainer = RaisingTrainer(mlp_config(DeviceParameters.DDP(comm=comm)), callbacks=[probe])
    if to_raise is not None:
        trainer.raise_on_ranks, trainer.to_raise = ranks, to_raise
    start = time.monotonic()
    report: dict[str, Any] = {"error": None}
    try:
        trainer.fit()
    except BaseException as error:  # KeyboardInterrupt included
        report.update(error=type(error).__name__, message=str(error))
    report.update(
        seconds=time.monotonic() - start,
        initialized_after=dist.is_initialized(),
        seen=probe.seen,
        steps=trainer.global_step,
    )
    return report


def three_runs_in_fresh_processes(ports: list[int]) -> dict[str, dict[str, Any]]:
    """Each fit starts its own process group (on a new port: the previous one was destroyed)."""
    runs: dict[str, dict[str, Any]] = {}
    runs["success"] = fit_and_report()
    # Never the port just used: torch reuses a live TCPStore server on a port in the same
    # process, and its keys from the last run would pair ranks of different runs.
    ports = [port for port in ports if str(port) != os.environ["MASTER_PORT"]]
    os.environ["MASTER_PORT"] = str(ports[0])
    runs["interrupt"] = fit_and_report(KeyboardInterrupt, (0, 1))
    os.environ["MASTER_PORT"] = str(ports[1])
    runs["error"] = fit_and_report(RuntimeError, (1,), train_timeout_seconds=TRAIN_TIMEOUT_S)
    return runs


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@functools.cache
def fresh_runs() -> tuple[dict[str, dict[str, Any]], ...]:
    ports = _free_ports(3)  # one may be the first run's port; two others remain
    return tuple(run_with_fresh_ranks(three_runs_in_fresh_processes, 2, ports, timeout=90))


def test_a_successful_fit_destroys_the_process_group_it_created():
    for rank, runs in enumerate(fresh_runs()):
        run = runs["success"]
        assert (run["error"], run["steps"]) == (None, 2), f"rank {rank}"
        assert run["seen"] == [("post_setup", True)]
        assert run["initialized_after"] is False


def test_keyboard_interrupt_calls_on_interrupt_then_reraises_with_the_group_destroyed():
    for rank, runs in enumerate(fresh_runs()):
        run = runs["interrupt"]
        assert run["error"] == "KeyboardInterrupt", f"rank {rank}: {run}"
        assert run["message"] == f"raised in training_step on rank {rank}"
        # on_interrupt runs while the group is still up (a callback may still communicate).
        assert run["seen"] == [("post_setup", True), ("on_interrupt", True)]
        assert run["initialized_after"] is False


def test_an_exception_on_one_rank_fails_both_ranks_and_destroys_their_groups():
    rank0, rank1 = (runs["error"] for runs in fresh_runs())
    assert (rank1["error"], rank1["message"]) == (
        "RuntimeError",
        "raised in training_step on rank 1",
    )
    assert rank0["error"] == "RuntimeError", rank0  # it was waiting for rank 1 in a collective
    assert rank0["seconds"] < TRAIN_TIMEOUT_S + 30  # failed; did not hang
    assert rank0["seen"] == rank1["seen"] == [("post_setup", True)]  # not an interrupt
    assert rank0["initialized_after"] is False and rank1["initialized_after"] is False


def fit_twice_in_existing_group() -> dict[str, Any]:
    world = dist.group.WORLD
    ok = fit_and_report()
    failed = fit_and_report(RuntimeError, (0, 1))
    total = torch.ones(1)
    dist.all_reduce(total)
    return {
        "ok": ok,
        "failed": failed,
        "same_group": dist.group.WORLD is world,
        "all_reduce": total.item(),
    }


def test_fit_in_an_existing_process_group_leaves_it_alive_even_after_an_error():
    for result in run_on_ranks(fit_twice_in_existing_group, 2):
        assert result["ok"]["error"] is None and result["ok"]["initialized_after"] is True
        assert result["failed"]["error"] == "RuntimeError"
        assert result["failed"]["initialized_after"] is True
        assert result["same_group"] is True and result["all_reduce"] == 2.0


# ------------------------------- mistakes stop the run with errors that say what to change


class NoModelTrainer(MLPTrainer):
    def configure_models(self) -> None:
        self.loss_fn = nn.MSELoss()  # a module, but no parameters: not a model


class NoOptimizerTrainer(MLPTrainer):
    def configure_optimizers(self) -> None:
        self.lr = 0.1


class ListLoadersTrainer(MLPTrainer):
    def configure_dataloaders(self) -> Any:
        return list(super().configure_dataloaders())


class NeverStepsTrainer(MLPTrainer):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        self.backward(self.loss(batch))
        return {}


class AlwaysStepsTrainer(MLPTrainer):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        self.backward(self.loss(batch))
        self.step(self.optimizer)
        return {}


class FlatModelTrainer(MLPTrainer):
    def configure_models(self) -> None:
        self.model = FlatMLP()


class MetaAfterInitTrainer(MLPTrainer):
    """A sharded init that replaces a parameter with a fresh one on the meta device."""

    def init_weights(self) -> None:
        super().init_weights()
        self.model.layers[1].bias = nn.Parameter(torch.empty(OUT, device="meta"))


class MetaAttributeMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(OUT)  # a plain attribute, not a buffer: to_empty never moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class MetaAttributeTrainer(MLPTrainer):
    def configure_models(self) -> None:
        self.model = MetaAttributeMLP()


@pytest.mark.parametrize(
    ("trainer_class", "fields", "kind", "fragments"),
    [
        (NoModelTrainer, {}, RuntimeError, ["NoModelTrainer.configure_models assigned no"]),
        (NoOptimizerTrainer, {}, RuntimeError, ["configure_optimizers assigned no"]),
        (ListLoadersTrainer, {}, TypeError, ["must return (train_loader", "got list"]),
        (NeverStepsTrainer, {}, RuntimeError, ["did not call self.step(optimizer)", "step 0"]),
        (
            AlwaysStepsTrainer,
            {"training": {"gradient_accumulation_steps": 2}},
            RuntimeError,
            ["while accumulating gradients (micro-batch 1 of 2)", "is_accumulating_gradients"],
        ),
        (
            FlatModelTrainer,
            {"device_parameters": DeviceParameters.SINGLE_DEVICE(checkpoint_activations=True)},
            RuntimeError,
            ["checkpoint_activations=True", "'model' (FlatMLP)", "apply_activation_checkpointing"],
        ),
        (
            MetaAfterInitTrainer,
            {"weight_init": "sharded"},
            RuntimeError,
            ["model.layers.1.bias is still on the meta device"],
        ),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_setup_and_loop_mistakes_raise_errors_that_say_what_to_change(
    trainer_class, fields, kind, fragments
):
    fields = dict(fields)
    trainer = trainer_class(mlp_config(fields.pop("device_parameters", None), **fields))
    with pytest.raises(kind) as error:
        trainer.fit()
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_plain_tensor_attribute_left_on_meta_is_named_at_setup():
    trainer = MetaAttributeTrainer(mlp_config())
    with pytest.raises(RuntimeError, match=r"model\.scale .*meta device.*register_buffer"):
        trainer.fit()


# ------------------------------------------------------------ lean composition


class LeanTrainer(MLPHooks, SetupMixin):
    """BaseTrainer + SetupMixin only: no logger, no metrics library."""

    config: LeanMLPConfig


def lean_config() -> LeanMLPConfig:
    training = TrainingParameters(n_epochs=1, train_steps_per_epoch=2)
    return LeanMLPConfig(seed=3, training_parameters=training)


class CaptureInitial(Callback):
    def post_setup(self) -> None:
        self.weights = full_state(self.trainer.model)


def test_a_lean_trainer_without_logger_or_metrics_trains_and_validates():
    capture = CaptureInitial()
    trainer = LeanTrainer(lean_config(), callbacks=[capture])
    assert not isinstance(trainer, (LoggerMixin, EvalMetricMixin))
    trainer.fit()
    assert trainer.global_step == 2
    final = full_state(trainer.model)
    assert all(not torch.equal(final[n], w) for n, w in capture.weights.items())
    # Validation: batch-size-weighted mean over the 8 validation samples in batches of 4.
    val = RegressionData(8, seed=2)
    with torch.no_grad():
        losses = [F.mse_loss(trainer.model(val.x[i : i + 4]), val.y[i : i + 4]) for i in (0, 4)]
    expected = (losses[0] * 4 + losses[1] * 4) / 8
    assert trainer.validation_results == {"val_loss": pytest.approx(expected.item(), rel=1e-6)}
    assert trainer.last_train_metrics == {}  # no logger: training metrics are never reduced


LEAN_SCRIPT = """
import json, sys
import dream_trainer.trainer
loaded = {"import": [m for m in ("wandb", "torchmetrics") if m in sys.modules]}
from tests.test_trainer_lifecycle import LeanTrainer, lean_config
trainer = LeanTrainer(lean_config())
trainer.fit()
loaded["fit"] = [m for m in ("wandb", "torchmetrics") if m in sys.modules]
loaded["steps"] = trainer.global_step
print("RESULT" + json.dumps(loaded))
"""


def test_importing_the_trainer_and_fitting_a_lean_trainer_import_neither_wandb_nor_torchmetrics():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", LEAN_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    assert json.loads(line[len("RESULT") :]) == {"import": [], "fit": [], "steps": 2}
