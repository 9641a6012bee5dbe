"""Profiler: traces land in {run_dir}/profiler, training is unchanged, and the profiler stops at
the end of fit even mid-schedule or after a failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dream_trainer.callbacks import Profiler
from tests.trainer_fixtures import MLPTrainer, full_state, mlp_config


def fit(tmp_path: Path, name: str, trainer_class: type = MLPTrainer, **profiler: Any) -> Any:
    config = mlp_config(
        training={"n_epochs": 1, "max_steps": 6},
        train_size=24,
        global_batch=4,
        run_dir=str(tmp_path / name),
    )
    callbacks = [Profiler(**profiler)] if profiler else []
    trainer = trainer_class(config, callbacks=callbacks)
    trainer.fit()
    return trainer


def traces(trainer: Any) -> list[Path]:
    return sorted((trainer.run_dir / "profiler").glob("rank0.*.pt.trace.json"))


def profiled_steps(trace: Path) -> list[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def profiler_running() -> bool:
    return bool(torch.autograd._profiler_enabled())


def test_a_trace_of_the_active_steps_is_written_and_training_is_unchanged(tmp_path):
    plain = fit(tmp_path, "plain")
    profiled = fit(tmp_path, "profiled", wait=1, warmup=1, active=2)
    (trace,) = traces(profiled)
    assert profiled_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]  # steps 0-1: wait/warmup
    assert not profiler_running()
    for name, value in full_state(plain.model).items():
        assert torch.equal(full_state(profiled.model)[name], value), name


def test_fit_ending_while_recording_still_writes_the_trace(tmp_path):
    trainer = fit(tmp_path, "mid", wait=0, warmup=1, active=20)  # 6 steps: stops while active
    (trace,) = traces(trainer)
    # Steps 1-5, and what followed the last step until fit ended (as ProfilerStep#6).
    assert profiled_steps(trace) == [f"ProfilerStep#{i}" for i in range(1, 7)]
    assert not profiler_running()


class FailsAtStep3(MLPTrainer):
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_failed_run_stops_the_profiler(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, "failed", FailsAtStep3, wait=0, warmup=1, active=20)
    assert not profiler_running()
    fit(tmp_path, "after", wait=0, warmup=1, active=1)  # a new profiler can start


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"active": 0}, r"Profiler\(active=0\): active must be >= 1"),
        ({"wait": -1}, r"Profiler\(wait=-1\): wait must be >= 0"),
        ({"repeat": -2}, r"Profiler\(repeat=-2\): repeat must be >= 0; 0 repeats until the end"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Profiler(**kwargs)
