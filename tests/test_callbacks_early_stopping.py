"""EarlyStopping: stops fit normally when the monitored validation metric stops improving, at the
same step on every rank; NaN never improves; the sanity validation is ignored."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dream_trainer.callbacks import EarlyStopping
from dream_trainer.configs import DeviceParameters
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPTrainer, mlp_config


class ScriptedValidation(MLPTrainer):
    """Validation ``i`` (0: the sanity check) reports ``script[i]`` as ``score``, averaged over
    the ranks: rank r returns ``script[i] + 2r - (world size - 1)``, so only the mean is it."""

    script: list[float] = []

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        self.val_index = getattr(self, "val_index", -1) + 1
        results = super().validate(max_batches, log)
        self.seen.append((self.global_step, results.get("score")))
        return results

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        offset = 2 * self.world.rank - (self.world.world_size - 1)
        return {"score": torch.tensor(self.script[self.val_index] + offset)}


def run(
    script: list[float], run_dir: str, training: dict[str, Any], **stopping: Any
) -> dict[str, Any]:
    layout = DeviceParameters.DDP() if torch.distributed.get_world_size() > 1 else None
    config = mlp_config(
        layout,
        training=training,
        train_size=40,
        global_batch=4,
        run_dir=run_dir,
        checkpoint_parameters={"enable": True, "resume": "never"},
    )
    callback = EarlyStopping("score", **stopping)
    trainer = ScriptedValidation(config, callbacks=[callback])
    trainer.script, trainer.seen = script, []
    trainer.fit()
    checkpoints = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*"))
    return {
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "seen": trainer.seen,
        "state": callback.state_dict(),
        "reason": trainer.stop_reason,
        "checkpoints": checkpoints,
    }


def test_two_ranks_stop_at_the_same_step_after_patience_validations_without_improvement(tmp_path):
    nan = float("nan")
    # Sanity check (ignored, or 0 would be the best), then one validation per step: best 4.0 at
    # step 2; NaN and 3.96 (not below 4.0 - min_delta) do not improve: stop after step 4.
    script = [0.0, 5.0, 4.0, nan, 3.96, 1.0, 1.0]
    training = {"n_epochs": 1, "max_steps": 6, "val_every_n_steps": 1, "num_sanity_val_steps": 1}
    results = run_on_ranks(
        run, 2, script, str(tmp_path), training, mode="min", patience=2, min_delta=0.05
    )
    for result in results:
        assert result["step"] == 4
        assert [step for step, _ in result["seen"]] == [0, 1, 2, 3, 4]
        assert result["state"]["best"] == pytest.approx(4.0)
        assert result["state"]["wait"] == 2 and result["state"]["stopped_step"] == 4
        assert "score did not improve for 2 validations in a row" in result["reason"]
        assert result["checkpoints"] == ["step_00000004"]  # the end-of-fit checkpoint still runs
    # The validation results are reduced over the ranks: both ranks saw the same values.
    first, second = (r["seen"] for r in results)
    assert [v for _, v in first][:3] == [v for _, v in second][:3] == pytest.approx([0.0, 5, 4])
    assert math.isnan(first[3][1]) and math.isnan(second[3][1])
    assert first[4] == second[4]


def test_max_mode_stops_between_epochs_and_counts_the_epoch_as_done(tmp_path):
    script = [0.1, 0.3, 0.2, 0.25, 0.9]  # validations at the end of epochs 0..4
    training = {"n_epochs": 5, "train_steps_per_epoch": 2}
    (result,) = run_on_ranks(run, 1, script, str(tmp_path), training, mode="max", patience=2)
    assert result["step"] == 8 and result["epoch"] == 4  # stopped after epoch 3's validation
    assert result["state"] == {"best": pytest.approx(0.3), "wait": 2, "stopped_step": 8}


def missing_metric(run_dir: str) -> str:
    config = mlp_config(run_dir=run_dir)
    try:
        MLPTrainer(config, callbacks=[EarlyStopping("val/loss")]).fit()
    except KeyError as error:
        return str(error)
    return "no error"


def test_a_metric_validation_does_not_return_is_an_error_naming_the_keys(tmp_path):
    (message,) = run_on_ranks(missing_metric, 1, str(tmp_path))
    assert "EarlyStopping(monitor='val/loss'): validation returned no such metric" in message
    assert "['val_loss']" in message


def test_state_round_trips():
    stopping = EarlyStopping("val/loss", patience=3)
    stopping.load_state_dict({"best": 0.5, "wait": 2, "stopped_step": None})
    assert stopping.state_dict() == {"best": 0.5, "wait": 2, "stopped_step": None}
    assert stopping.improves(0.4) and not stopping.improves(0.5) and not stopping.improves(math.nan)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": ""}, ValueError, r"EarlyStopping\(monitor=''\): give the validation metric"),
        ({"mode": "lowest"}, ValueError, r"EarlyStopping\(mode='lowest'\): mode must be 'min'"),
        ({"patience": -1}, ValueError, r"EarlyStopping\(patience=-1\): patience must be >= 0"),
        ({"patience": 1.5}, TypeError, r"patience must be an integer"),
        ({"min_delta": -0.1}, ValueError, r"EarlyStopping\(min_delta=-0.1\): min_delta must be"),
        ({"min_delta": math.nan}, TypeError, r"min_delta must be a finite number"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument_and_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**{"monitor": "val/loss", **kwargs})
