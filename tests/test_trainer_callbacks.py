"""Callbacks: every hook fires in order with exact counts; instances, state and typed needs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer import (
    BaseTrainer,
    Callback,
    EvalMetricMixin,
    LoggerMixin,
    SetupMixin,
)
from dream_trainer.trainer.callback import HOOKS
from tests.trainer_fixtures import MLPConfig, MLPTrainer, mlp_config

EPOCHS, STEPS, ACCUM, VAL_BATCHES = 2, 3, 2, 2


class Recorder(Callback[BaseTrainer]):
    """Appends ``(hook, argument summary)`` for every hook call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"events": len(self.events)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict


def _recording_hook(hook: str) -> Any:
    def record(self: Recorder, *args: Any) -> None:
        summary: Any = None
        if hook in ("pre_train_step", "pre_validation_step"):
            summary = (args[1], tuple(args[0]["x"].shape))  # (batch_idx, batch shape)
        elif hook in ("post_train_step", "post_validation_step"):
            summary = (args[1], sorted(args[0]))  # (batch_idx, result keys)
        elif "optimizer" in hook:
            summary = args[0] is self.trainer.optimizer
        elif hook == "post_validation_epoch":
            summary = sorted(args[0])
        self.events.append((hook, summary))

    return record


for _hook in HOOKS:
    setattr(Recorder, _hook, _recording_hook(_hook))


class OtherRecorder(Recorder):
    pass


def expected_events() -> list[tuple[str, Any]]:
    """The hook sequence of EPOCHS x STEPS x ACCUM training batches, validating each epoch."""
    events: list[tuple[str, Any]] = [(h, None) for h in HOOKS[:7]]  # pre_launch .. pre_fit
    for _ in range(EPOCHS):
        events.append(("pre_epoch", None))
        for batch_idx in range(STEPS * ACCUM):
            events.append(("pre_train_step", (batch_idx, (2, 4))))
            if batch_idx % ACCUM == ACCUM - 1:
                events += [
                    ("pre_optimizer_step", True),
                    ("post_optimizer_step", True),
                    ("pre_optimizer_zero_grad", True),
                    ("post_optimizer_zero_grad", True),
                ]
            events.append(("post_train_step", (batch_idx, ["loss"])))
        events += [("post_epoch", None), ("pre_validation_epoch", None)]
        for batch_idx in range(VAL_BATCHES):
            events.append(("pre_validation_step", (batch_idx, (4, 4))))
            events.append(("post_validation_step", (batch_idx, ["val_loss"])))
        events.append(("post_validation_epoch", ["val_loss"]))
    events.append(("post_fit", None))
    return events


def run_config() -> MLPConfig:
    training = {
        "n_epochs": EPOCHS,
        "train_steps_per_epoch": STEPS,
        "gradient_accumulation_steps": ACCUM,
    }
    # 2 samples per micro-batch; 8 validation samples in batches of 4.
    return mlp_config(training=training, train_size=12, global_batch=2, val_size=8)


@pytest.fixture(scope="module")
def fitted() -> tuple[MLPTrainer, list[Recorder]]:
    callbacks = [Recorder(), OtherRecorder(), Recorder()]
    trainer = MLPTrainer(run_config(), callbacks=callbacks)
    trainer.fit()
    return trainer, callbacks


def test_every_hook_but_on_interrupt_fires_in_order_with_exact_arguments(fitted):
    trainer, (recorder, _, _) = fitted
    assert trainer.global_step == EPOCHS * STEPS
    assert recorder.events == expected_events()
    assert {hook for hook, _ in recorder.events} == set(HOOKS) - {"on_interrupt"}


def test_hook_counts_follow_epochs_steps_accumulation_and_validation_batches(fitted):
    _, (recorder, _, _) = fitted
    counts = Counter(hook for hook, _ in recorder.events)
    batches, steps = EPOCHS * STEPS * ACCUM, EPOCHS * STEPS
    assert counts == {
        **{hook: 1 for hook in ("pre_launch", "post_launch", "pre_configure", "post_configure")},
        **{hook: 1 for hook in ("pre_setup", "post_setup", "pre_fit", "post_fit")},
        "pre_epoch": EPOCHS,
        "post_epoch": EPOCHS,
        "pre_train_step": batches,
        "post_train_step": batches,
        **{h: steps for h in HOOKS if "optimizer" in h},
        "pre_validation_epoch": EPOCHS,
        "post_validation_epoch": EPOCHS,
        "pre_validation_step": EPOCHS * VAL_BATCHES,
        "post_validation_step": EPOCHS * VAL_BATCHES,
    }


def test_several_instances_of_one_class_all_fire_and_get_numbered_state_keys(fitted):
    trainer, (first, other, second) = fitted
    assert first.events == second.events == other.events == expected_events()
    assert first.trainer is second.trainer is other.trainer is trainer
    assert trainer.callbacks.keys() == ["Recorder#0", "OtherRecorder", "Recorder#1"]


def test_callback_state_round_trips_through_the_trainer_state_dict(fitted):
    trainer, _ = fitted
    n = len(expected_events())
    state = trainer.state_dict()
    assert state["trainer"] == {
        "global_step": EPOCHS * STEPS,
        "current_epoch": EPOCHS,
        "epoch_batches": 0,
        "epoch_samples": 0,
        "skipped_steps": 0,
    }
    assert state["callbacks"] == {
        "Recorder#0": {"events": n},
        "OtherRecorder": {"events": n},
        "Recorder#1": {"events": n},
    }
    state["callbacks"]["Recorder#1"] = {"events": -1}  # tell the two Recorders apart
    fresh = [Recorder(), OtherRecorder(), Recorder()]
    resumed = MLPTrainer(run_config(), callbacks=[*fresh, LoadState(state)])
    resumed.fit()  # loads after setup; the loaded counters say training is already done
    assert [c.restored for c in fresh] == [{"events": n}, {"events": n}, {"events": -1}]
    assert (resumed.global_step, resumed.current_epoch) == (EPOCHS * STEPS, EPOCHS)
    assert not any(hook == "pre_train_step" for hook, _ in fresh[0].events)


class LoadState(Callback):
    """Resumes from ``state`` once models, optimizers and loaders exist."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def post_setup(self) -> None:
        self.trainer.load_state_dict(self.state)


class NeedsMetrics(Callback[EvalMetricMixin]):
    pass


class LeanTrainer(SetupMixin):
    pass


def test_a_callback_needing_a_mixin_the_trainer_lacks_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"NeedsMetrics needs a trainer that is a EvalMetricMixin"):
        LeanTrainer(run_config(), callbacks=[NeedsMetrics()])


def test_a_non_callback_is_refused_with_its_type():
    with pytest.raises(TypeError, match="Callback instances, got function"):
        MLPTrainer(run_config(), callbacks=[lambda: None])  # type: ignore[list-item]


class LogLearningRate(Callback[LoggerMixin]):
    def post_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.trainer.log_dict({"lr": optimizer.param_groups[0]["lr"]}, self.trainer.global_step)


class LogCapture(MLPTrainer):
    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged.append((step, metrics))


def test_a_logger_callback_on_dream_trainer_logs_through_the_trainer(tmp_path):
    config = mlp_config(
        logging=LoggingParameters(backends=["jsonl"], log_every_n_steps=1), run_dir=str(tmp_path)
    )
    trainer = LogCapture(config, callbacks=[LogLearningRate()])
    trainer.logged = []
    trainer.fit()
    assert [(step, m) for step, m in trainer.logged if "lr" in m] == [
        (0, {"lr": 0.1}),
        (1, {"lr": 0.1}),
    ]
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert trainer.run_dir.parent == tmp_path / "dream-trainer" / "run"
    assert sum('"lr": 0.1' in line for line in lines) == 2


def test_hooks_call_only_the_callbacks_that_override_them_in_order() -> None:
    from dream_trainer.trainer.callback import CallbackCollection

    calls: list[str] = []

    class First(Callback[Any]):
        def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
            calls.append(f"first {batch_idx}")

    class Second(First):  # inherits the override: still a listener
        pass

    class Silent(Callback[Any]):
        pass

    silent = Silent()
    silent.pre_epoch = lambda: calls.append("instance pre_epoch")  # type: ignore[method-assign]
    collection = CallbackCollection([First(), Silent(), Second(), silent])
    collection.post_train_step({}, 3)
    collection.pre_epoch()
    collection.post_fit()  # nobody listens: nothing runs, no error
    assert calls == ["first 3", "first 3", "instance pre_epoch"]

    class Late(Callback[Any]):
        def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
            calls.append(f"late {batch_idx}")

    collection.append(Late())  # the cached dispatchers are rebuilt
    calls.clear()
    collection.post_train_step({}, 4)
    assert calls == ["first 4", "first 4", "late 4"]
    with pytest.raises(AttributeError):
        collection.not_a_hook  # noqa: B018
