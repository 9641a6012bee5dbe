"""The trainer's predict loop: replicas of any layout, results equal to one process, in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters
from dream_trainer.inference import JsonlResultFile
from dream_trainer.parallel import colwise_parallel, rowwise_parallel
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import IN, MLP, MLPTrainer, mlp_config


class ChainMLP(MLP):
    """The MLP as a chain of blocks (pipeline stages can split it) with a TP plan."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(torch.tanh(x))
        return x

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        return {"layers.0": colwise_parallel(), "layers.1": rowwise_parallel()}


class PredictingMLP(MLPTrainer):
    """The MLP regression with a predict step: one output row per input vector."""

    def configure_models(self) -> None:
        self.model = ChainMLP()

    def predict_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        x = torch.stack([item["x"] for item in batch]).to(self.device)
        out = self.forward_outputs(self.model, x)  # through the schedule under PP
        if hasattr(out, "full_tensor"):
            out = out.full_tensor()
        return [{"id": item["id"], "y": row.tolist()} for item, row in zip(batch, out)]


def _items(n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(5)
    return [{"id": i, "x": torch.randn(IN, generator=g)} for i in range(n)]


LAYOUTS = {
    "single": DeviceParameters.SINGLE_DEVICE(),
    "ddp4": DeviceParameters.DDP(),
    "fsdp4": DeviceParameters.FSDP(),  # forward all-gathers: ranks run in lockstep
    "tp2_dp2": DeviceParameters(dp_replicate=2, dp_shard=1, tensor_parallel=2),
    "pp2_dp2": DeviceParameters(pipeline_parallel=2, dp_replicate=2, dp_shard=1),
}


def _predict(layout: str, n: int, plan: bool) -> list[Any] | None:
    trainer = PredictingMLP(mlp_config(LAYOUTS[layout], plan=plan))
    return trainer.predict(_items(n), batch_size=2)


@pytest.fixture(scope="module")
def one_process() -> list[Any]:
    out = run_on_ranks(_predict, 1, "single", 11, True)[0]
    assert out is not None
    return out


@pytest.mark.parametrize("layout", ["ddp4", "fsdp4", "tp2_dp2", "pp2_dp2"])
def test_predict_under_a_layout_equals_one_process_in_input_order(
    layout: str, one_process: list[Any]
) -> None:
    results = run_on_ranks(_predict, 4, layout, 11, True, timeout=120)
    assert results[1:] == [None, None, None]
    got = results[0]
    assert got is not None and [r["id"] for r in got] == list(range(11))
    for mine, reference in zip(got, one_process):
        torch.testing.assert_close(mine["y"], reference["y"], rtol=1e-5, atol=1e-6)


def _predict_to_file(path: str) -> tuple[int, int]:
    trainer = PredictingMLP(mlp_config(DeviceParameters.FSDP(), plan=True))
    with trainer.serving():
        first = trainer.predict_to_jsonl(_items(5), path, batch_size=2)
        again = trainer.predict_to_jsonl(_items(9), path, batch_size=2, resume=True)
    return (first.written, again.written)


def test_predict_to_jsonl_inside_one_serving_session_resumes_by_key(
    tmp_path: Path, one_process: list[Any]
) -> None:
    path = str(tmp_path / "predictions.jsonl")
    assert run_on_ranks(_predict_to_file, 2, path)[0] == (5, 4)
    records = JsonlResultFile(path).records()
    assert [r["id"] for r in records] == list(range(9))
    for mine, reference in zip(records, one_process):
        torch.testing.assert_close(mine["y"], reference["y"], rtol=1e-5, atol=1e-6)


def _serving_sets_up_no_data_or_optimizer() -> dict[str, Any]:
    trainer = PredictingMLP(mlp_config(DeviceParameters.SINGLE_DEVICE()))
    with trainer.serving():
        state = {
            "loaders": (trainer.train_dataloader, trainer.val_dataloader),
            "optimizers": list(trainer.named_optimizers()),
            "training": trainer.model.training,
        }
    return state


def test_serving_sets_up_models_only_in_eval_mode() -> None:
    state = run_on_ranks(_serving_sets_up_no_data_or_optimizer, 1)[0]
    assert state == {"loaders": (None, None), "optimizers": [], "training": False}


def _no_predict_step() -> str:
    trainer = MLPTrainer(mlp_config())
    try:
        trainer.predict(_items(2))
    except NotImplementedError as error:
        return str(error)
    return "no error"


def test_a_trainer_without_predict_step_says_what_to_implement() -> None:
    message = run_on_ranks(_no_predict_step, 1)[0]
    assert (
        message == "MLPTrainer must implement predict_step(batch) -> one result per item to predict"
    )
