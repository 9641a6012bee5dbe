"""GarbageCollection: automatic gc is off during fit, gc.collect runs every N steps, and the gc
state comes back when fit ends, also after a failure."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dream_trainer.callbacks import GarbageCollection
from dream_trainer.trainer import Callback
from tests.trainer_fixtures import MLPTrainer, mlp_config


class Watch(Callback):
    """Whether automatic gc is on at every micro-batch, and each collection's (step, generation)."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []
        self.collections: list[tuple[int, int]] = []

    def pre_train_step(self, batch: Any, batch_idx: int) -> None:
        self.enabled.append(gc.isenabled())

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.collections.append((self.trainer.global_step, info["generation"]))


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def fit_watching(trainer_class: type[MLPTrainer], tmp_path: Any, **kwargs: Any) -> Watch:
    watch = Watch()
    config = mlp_config(
        training={"n_epochs": 1, "max_steps": 7, "gradient_accumulation_steps": 2},
        train_size=28,
        global_batch=2,
        run_dir=str(tmp_path),
    )
    trainer = trainer_class(config, callbacks=[GarbageCollection(**kwargs), watch])
    gc.callbacks.append(watch.on_gc)
    try:
        trainer.fit()
    finally:
        gc.callbacks.remove(watch.on_gc)
    return watch


def test_automatic_gc_is_off_during_training_and_collections_run_every_n_steps(
    gc_enabled, tmp_path
):
    watch = fit_watching(MLPTrainer, tmp_path, every_n_steps=3, generation=2)
    assert len(watch.enabled) == 14 and not any(watch.enabled)
    # Collections during training are ours (automatic ones are off): after steps 3 and 6.
    assert [c for c in watch.collections if 0 < c[0] < 7] == [(3, 2), (6, 2)]
    assert gc.isenabled()


class FailsAtStep(MLPTrainer):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_the_gc_state_is_restored_after_a_failed_run(gc_enabled, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit_watching(FailsAtStep, tmp_path, every_n_steps=1)
    assert gc.isenabled()
    assert "teardown" not in vars(FailsAtStep)  # the trainer class was not touched


def test_gc_left_disabled_before_fit_stays_disabled(gc_enabled, tmp_path):
    gc.disable()
    fit_watching(MLPTrainer, tmp_path, every_n_steps=2)
    assert not gc.isenabled()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, r"GarbageCollection\(every_n_steps=0\)"),
        ({"generation": 3}, ValueError, r"GarbageCollection\(generation=3\): Python has"),
        ({"generation": -1}, ValueError, r"GarbageCollection\(generation=-1\)"),
        ({"every_n_steps": "10"}, TypeError, r"every_n_steps must be an integer"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        GarbageCollection(**kwargs)
