"""The rank-0 progress bar (tqdm or plain lines) and the trainer's own skipped-step count."""

from __future__ import annotations

import io
import logging
import re
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer.progress_bar import (
    ProgressBar,
    open_progress_bar,
    planned_steps,
    wants_progress_bar,
)
from tests.test_warnings_and_conventions import recorded_warnings
from tests.trainer_fixtures import MLPTrainer, mlp_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_shows_a_bar_only_on_a_terminal():
    assert wants_progress_bar("auto", Terminal())
    assert not wants_progress_bar("auto", io.StringIO())
    assert wants_progress_bar(True, io.StringIO())
    assert not wants_progress_bar(False, Terminal())


def test_the_setting_is_validated():
    assert LoggingParameters().progress_bar == "auto"
    assert LoggingParameters(progress_bar=False).progress_bar is False
    with pytest.raises(ValueError, match="progress_bar"):
        LoggingParameters(progress_bar="sometimes")


def test_the_total_is_max_steps_or_epochs_times_steps_per_epoch_whichever_comes_first():
    assert planned_steps(None, 3, 10) == 30
    assert planned_steps(12, 3, 10) == 12
    assert planned_steps(50, 3, 10) == 30
    assert planned_steps(7, 1, None) == 7
    assert planned_steps(None, 2, None) is None


def test_plain_lines_show_epoch_step_loss_tokens_and_eta_once_per_log_step():
    out = io.StringIO()
    bar = ProgressBar(total=100, initial=0, epoch=0, stream=out, use_tqdm=False)
    assert not bar.uses_tqdm
    bar.advance(1, 0)
    bar.note_metrics({"train/loss": 0.123456, "train/tokens_per_s": 12345.6}, 2)
    bar.note_metrics({"train/skipped_steps": 0.0}, 2)  # same step: no second line
    bar.note_metrics({"val_loss": 1.0}, 2)  # validation: no line
    bar.advance(2, 0)
    bar.advance(50, 1)
    bar.note_metrics({"train/loss": 0.1}, 50)
    bar.close()
    bar.note_metrics({"train/loss": 0.1}, 60)  # closed: nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"epoch 0  step 2/100  loss 0.1235  tokens/s 12,346  eta \d\d:\d\d", lines[0]
    )
    assert lines[1].startswith("epoch 1  step 50/100  loss 0.1  tokens/s 12,346  eta ")


def test_not_on_other_ranks_nor_when_switched_off():
    def trainer(rank0: bool, setting: Any) -> Any:
        return SimpleNamespace(
            world=SimpleNamespace(is_global_zero=rank0),
            config=SimpleNamespace(logging_parameters=LoggingParameters(progress_bar=setting)),
        )

    assert open_progress_bar(trainer(False, True), Terminal()) is None
    assert open_progress_bar(trainer(True, False), Terminal()) is None
    assert open_progress_bar(trainer(True, "auto"), io.StringIO()) is None


class Steps(MLPTrainer):
    fail_at: int | None = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def fit_capturing_stdout(
    tmp_path: Any, monkeypatch: Any, fail_at: int | None = None, **logging: Any
) -> tuple[Steps, str]:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    config = mlp_config(
        logging=LoggingParameters(backends=[], log_every_n_steps=2, **logging),
        training={"n_epochs": 2, "train_steps_per_epoch": 2},
        run_dir=str(tmp_path),
    )
    trainer = Steps(config)
    trainer.fail_at = fail_at
    handlers = list(logging_handlers())
    try:
        trainer.fit()
    finally:
        assert logging_handlers() == handlers  # the bar's log redirection was undone
    return trainer, out.getvalue()


def logging_handlers() -> list[Any]:
    return logging.getLogger().handlers + logging.getLogger("dream_trainer").handlers


def test_a_fit_shows_a_tqdm_bar_on_rank_0_and_closes_it(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    trainer, out = fit_capturing_stdout(tmp_path, monkeypatch, progress_bar=True)
    last = out.split("\r")[-1]
    assert re.search(r"epoch 1: 100%.* 4/4 .*loss=[0-9.]+", last), repr(out)
    assert trainer.progress_bar is None


def test_without_tqdm_a_fit_prints_plain_lines_at_log_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    _, out = fit_capturing_stdout(tmp_path, monkeypatch, progress_bar=True)
    lines = out.splitlines()
    assert [line.split("  loss")[0] for line in lines] == ["epoch 0  step 2/4", "epoch 1  step 4/4"]


def test_auto_off_a_terminal_prints_nothing(tmp_path, monkeypatch):
    _, out = fit_capturing_stdout(tmp_path, monkeypatch)
    assert out == ""


def test_the_bar_is_closed_when_fit_fails(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    trainer = None
    with pytest.raises(RuntimeError, match="boom"):
        trainer, _ = fit_capturing_stdout(tmp_path, monkeypatch, fail_at=1, progress_bar=True)
    from tqdm import tqdm

    assert not list(getattr(tqdm, "_instances", []))
    assert trainer is None


# ------------------------------------------------------------ skipped steps


class MostlyNaN(MLPTrainer):
    nan = True

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.nan and self.global_step % 4:  # steps 1-3, 5-7: NaN inputs
            batch = {**batch, "x": batch["x"] * float("nan")}
        return super().training_step(batch, batch_idx)

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/skipped_steps" in metrics:
            self.counts.append((step, metrics["train/skipped_steps"]))


def test_skipped_steps_are_logged_and_reported_without_any_callback(tmp_path):
    config = mlp_config(
        logging=LoggingParameters(backends=[], log_every_n_steps=2, performance_metrics=False),
        training={"n_epochs": 1, "max_steps": 8, "on_non_finite_grad": "skip"},
        train_size=32,
        global_batch=4,
        run_dir=str(tmp_path),
    )
    trainer = MostlyNaN(config)
    trainer.counts = []
    with recorded_warnings() as warnings:
        trainer.fit()
    assert trainer.counts == [(2, 1.0), (4, 3.0), (6, 4.0), (8, 6.0)]
    assert [w for w in warnings if w.startswith("skipped ")] == [
        "skipped 6 of 8 optimizer steps (non-finite gradient norm)"
    ]
    assert trainer.state_dict()["trainer"]["skipped_steps"] == 6


def test_no_skipped_steps_key_unless_the_mode_is_skip(tmp_path):
    config = mlp_config(logging=LoggingParameters(backends=[], log_every_n_steps=1))
    trainer = MostlyNaN(config.model_copy(update={"run_dir": str(tmp_path)}))
    trainer.nan, trainer.counts = False, []
    trainer.fit()
    assert trainer.global_step == 2 and trainer.counts == []


def test_the_skipped_count_continues_after_a_resume(tmp_path):
    def fit(max_steps: int) -> MostlyNaN:
        config = mlp_config(
            logging=LoggingParameters(backends=[], log_every_n_steps=2, performance_metrics=False),
            training={"n_epochs": 1, "max_steps": max_steps, "on_non_finite_grad": "skip"},
            train_size=32,
            global_batch=4,
            run_dir=str(tmp_path),
            run_id="r",
            checkpoint_parameters={"enable": True, "every_n_steps": 4},
        )
        trainer = MostlyNaN(config)
        trainer.counts = []
        trainer.fit()
        return trainer

    assert fit(4).counts == [(2, 1.0), (4, 3.0)]
    assert fit(8).counts == [(6, 4.0), (8, 6.0)]  # resumed at step 4 with 3 skipped
