"""Warnings users need (uneven data, ignored options) and library conventions (logging, wandb)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dream_trainer.configs import DeviceParameters, LoggingParameters
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPTrainer, mlp_config


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Keep()
    framework = logging.getLogger("dream_trainer")
    framework.addHandler(handler)
    try:
        yield messages
    finally:
        framework.removeHandler(handler)


def fit_and_collect_warnings(**fields: Any) -> list[str]:
    with recorded_warnings() as messages:
        MLPTrainer(mlp_config(DeviceParameters.DDP(), **fields)).fit()
    return messages


def test_a_rank_with_zero_batches_is_reported_with_the_counts():
    # 3 samples on 4 ranks: DistributedSampler(drop_last=True) gives every rank nothing.
    results = run_on_ranks(fit_and_collect_warnings, 4, train_size=3, global_batch=4, val_size=8)
    rank0 = results[0]
    assert any("3 samples, not a multiple of the 4 data-parallel ranks" in m for m in rank0)
    assert any(
        "yields 0 batches on rank(s) [0, 1, 2, 3] (batches per rank: [0, 0, 0, 0])" in m
        for m in rank0
    ), rank0
    assert not any("batches" in m or "samples" in m for m in results[1])  # rank 0 reports


def test_dropped_samples_are_reported():
    # 10 samples on 4 ranks: 2 per rank, 2 samples never seen.
    (rank0, *_) = run_on_ranks(
        fit_and_collect_warnings,
        4,
        train_size=10,
        global_batch=4,
        training={"n_epochs": 1},
    )
    assert any("each rank gets 2 and 2 samples are never seen" in m for m in rank0), rank0


def test_loss_parallel_without_tensor_parallelism_warns():
    (messages,) = run_on_ranks(fit_with_loss_parallel_alone, 1, timeout=120)
    assert (
        sum("loss_parallel=True has no effect without tensor parallelism" in m for m in messages)
        == 1
    )


def fit_with_loss_parallel_alone() -> list[str]:
    with recorded_warnings() as messages:
        MLPTrainer(mlp_config(DeviceParameters.SINGLE_DEVICE(loss_parallel=True))).fit()
    return messages


def wandb_mode_chosen(env_mode: str | None, config_mode: str | None) -> str:
    import os

    from dream_trainer.trainer.mixins import loggers

    if env_mode is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = env_mode
    chosen: list[str] = []

    class FakeSink:
        def __init__(self, config: Any, mode: str, run_dir: Any, run_id: Any) -> None:
            chosen.append(mode)

        def log(self, metrics: dict[str, float], step: int) -> None: ...

        def close(self) -> None: ...

    original = loggers.WandbSink
    loggers.WandbSink = FakeSink  # type: ignore[misc,assignment]
    try:
        logging_parameters = LoggingParameters(backends=["wandb"], wandb_mode=config_mode)
        MLPTrainer(mlp_config(logging=logging_parameters)).fit()
    finally:
        loggers.WandbSink = original  # type: ignore[misc]
    return chosen[0]


def test_wandb_mode_comes_from_the_environment_unless_the_config_says():
    assert run_on_ranks(wandb_mode_chosen, 1, "offline", None) == ["offline"]
    assert run_on_ranks(wandb_mode_chosen, 1, "offline", "disabled") == ["disabled"]
    assert run_on_ranks(wandb_mode_chosen, 1, None, None) == ["online"]


def test_importing_dream_trainer_configures_no_logging():
    code = (
        "import logging, dream_trainer, dream_trainer.trainer, dream_trainer.parallel\n"
        "framework = logging.getLogger('dream_trainer')\n"
        "assert framework.handlers == [] and framework.propagate, framework.handlers\n"
        "assert framework.level == logging.NOTSET and logging.getLogger().handlers == []\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def console_handlers_after_fit(configure_root: bool) -> dict[str, int]:
    root, framework = logging.getLogger(), logging.getLogger("dream_trainer")
    saved = (list(root.handlers), list(framework.handlers), framework.level)
    root.handlers.clear()
    framework.handlers.clear()
    framework.setLevel(logging.NOTSET)
    if configure_root:
        logging.basicConfig(level=logging.WARNING)
    try:
        MLPTrainer(mlp_config()).fit()
        return {"framework": len(framework.handlers), "level": framework.level}
    finally:
        root.handlers[:] = saved[0]
        framework.handlers[:] = saved[1]
        framework.setLevel(saved[2])


def test_fit_installs_a_console_handler_only_when_the_application_configured_none():
    assert run_on_ranks(console_handlers_after_fit, 1, False) == [
        {"framework": 1, "level": logging.INFO}
    ]
    assert run_on_ranks(console_handlers_after_fit, 1, True) == [
        {"framework": 0, "level": logging.NOTSET}
    ]
