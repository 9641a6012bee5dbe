"""LoggerMixin sinks (JSONL, wandb) on rank 0 and EvalMetricMixin's data-parallel torchmetrics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics

from dream_trainer.configs import DeviceParameters, LoggingParameters
from dream_trainer.trainer import Callback
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import OUT, MLPTrainer, RegressionData, mlp_config

pytestmark = pytest.mark.multirank

STEPS, ACCUM, LOG_EVERY = 4, 2, 2


class LossRecorder(MLPTrainer):
    """Keeps this rank's own training and validation losses, and what it logs."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        result = super().training_step(batch, batch_idx)
        self.train_losses.append(result["loss"].item())
        return result

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        result = super().validation_step(batch, batch_idx)
        self.val_losses.append(result["val_loss"].item())
        return result


def log_to_jsonl(run_dir: str) -> dict[str, Any]:
    config = mlp_config(
        DeviceParameters.DDP(),
        logging=LoggingParameters(
            backends=["jsonl"], log_every_n_steps=LOG_EVERY, performance_metrics=False
        ),
        training={
            "n_epochs": 1,
            "train_steps_per_epoch": STEPS,
            "gradient_accumulation_steps": ACCUM,
        },
        train_size=STEPS * ACCUM * 4,
        run_dir=run_dir,
        project="proj",
        experiment="exp1",
    )
    trainer = LossRecorder(config)
    trainer.train_losses, trainer.val_losses = [], []
    trainer.fit()
    sinks = [type(s).__name__ for s in trainer.metric_sinks]  # emptied by teardown
    return {
        "train": trainer.train_losses,
        "val": trainer.val_losses,
        "sinks_after": sinks,
        "run_id": trainer.run_id,
    }


def test_jsonl_is_written_by_rank_0_only_with_losses_averaged_over_ranks(tmp_path):
    rank0, rank1 = run_on_ranks(log_to_jsonl, 2, str(tmp_path))
    run_id = rank0["run_id"]
    assert run_id == rank1["run_id"]
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    run = Path("proj/exp1") / run_id
    assert files == [run / "config.json", run / "metrics.jsonl"]
    assert (tmp_path / "proj/exp1/latest").resolve() == (tmp_path / run).resolve()
    lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], sorted(set(x) - {"step", "time"})) for x in lines] == [
        (2, ["train/loss"]),
        (4, ["train/loss"]),
        (4, ["val_loss"]),
    ]
    assert rank0["sinks_after"] == rank1["sinks_after"] == []
    for line in lines[:2]:
        # The step's micro-batches, on each rank, then the mean of the two ranks' means.
        first = (line["step"] - 1) * ACCUM
        own = [sum(r["train"][first : first + ACCUM]) / ACCUM for r in (rank0, rank1)]
        assert line["train/loss"] == pytest.approx((own[0] + own[1]) / 2, rel=1e-6)
        assert abs(line["train/loss"] - own[0]) > 1e-3  # not rank 0's local value
    val = rank0["val"] + rank1["val"]  # equal batch sizes: the plain mean of all batches
    assert lines[2]["val_loss"] == pytest.approx(sum(val) / len(val), rel=1e-6)


class RecordLogged(MLPTrainer):
    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged.append(metrics)


def test_wandb_offline_creates_a_run_under_the_run_dir_and_logs_every_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = LoggingParameters(
        backends=["wandb"], wandb_mode="offline", log_every_n_steps=1, performance_metrics=False
    )
    config = mlp_config(
        logging=logging, run_dir=str(tmp_path / "runs"), project="p", experiment="e"
    )
    trainer = RecordLogged(config)
    trainer.logged = []
    trainer.fit()
    assert [sorted(m) for m in trainer.logged] == [["train/loss"], ["train/loss"], ["val_loss"]]
    wanted = [(k, json.dumps(v)) for metrics in trainer.logged for k, v in metrics.items()]
    root = trainer.run_dir / "wandb"
    assert trainer.run_dir.parent == tmp_path / "runs" / "p" / "e"
    missing = wanted
    deadline = time.monotonic() + 10.0  # the wandb service process writes the log itself
    while missing and time.monotonic() < deadline:
        runs = list(root.glob("offline-run-*/run-*.wandb"))
        data = runs[0].read_bytes() if len(runs) == 1 else b""
        missing = [(k, v) for k, v in wanted if not (k.encode() in data and v.encode() in data)]
        time.sleep(0.1 if missing else 0)
    assert not missing, (missing, sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*")))


def test_wandb_backend_without_wandb_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = mlp_config(logging=LoggingParameters(backends=["wandb"], wandb_mode="offline"))
    with pytest.raises(ImportError, match=r"pip install 'dream-trainer\[wandb\]'"):
        MLPTrainer(config).fit()


# --------------------------------------------------------------- torchmetrics


class MetricTrainer(MLPTrainer):
    """Data-only metrics, so the expected values follow from the validation set alone."""

    def configure_metrics(self) -> None:
        self.val_mean = torchmetrics.MeanMetric()
        self.val_sum = torchmetrics.SumMetric()
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(OUT, average="micro")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        self.val_mean.update(batch["y"][:, 0])
        self.val_sum.update(batch["y"][:, 0])
        self.val_acc.update(batch["x"][:, :OUT].argmax(-1), batch["label"])
        return {}


class RecordValidation(Callback):
    def __init__(self) -> None:
        self.results: list[dict[str, float]] = []

    def post_validation_epoch(self, results: dict[str, float]) -> None:
        self.results.append(dict(results))


VAL_SIZE = 16


def metric_values(indices: slice = slice(None)) -> dict[str, float]:
    val = RegressionData(VAL_SIZE, seed=2)
    y, correct = val.y[indices, 0], val.x[indices, :OUT].argmax(-1) == val.label[indices]
    return {
        "val_mean": y.mean().item(),
        "val_sum": y.sum().item(),
        "val_acc": correct.float().mean().item(),
    }


def validate_metrics(params: DeviceParameters, **fields: Any) -> list[dict[str, float]]:
    record = RecordValidation()
    config = mlp_config(
        params, training={"n_epochs": 2, "train_steps_per_epoch": 1}, val_size=VAL_SIZE, **fields
    )
    MetricTrainer(config, callbacks=[record]).fit()
    return record.results


def assert_union_values(results: list[dict[str, float]]) -> None:
    expected = metric_values()
    assert len(results) == 2  # one validation per epoch; the second must not accumulate
    for result in results:
        assert result.keys() == expected.keys()
        assert result["val_mean"] == pytest.approx(expected["val_mean"], rel=1e-6)
        assert result["val_sum"] == pytest.approx(expected["val_sum"], rel=1e-6)
        assert result["val_acc"] == expected["val_acc"]


def test_metric_values_differ_between_ranks_so_the_sync_tests_can_fail():
    union, rank0 = metric_values(), metric_values(slice(0, None, 2))
    assert all(abs(union[k] - rank0[k]) > 1e-3 for k in union)


def test_torchmetrics_on_two_data_parallel_ranks_cover_both_ranks_samples_and_reset():
    for results in run_on_ranks(validate_metrics, 2, DeviceParameters.DDP()):
        assert_union_values(results)


def test_torchmetrics_under_tensor_parallel_sync_over_data_parallel_ranks_only():
    # TP peers see the same samples: syncing over all 4 ranks would count each twice.
    params = DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2)
    for results in run_on_ranks(validate_metrics, 4, params, plan=True):
        assert_union_values(results)


def test_torchmetrics_on_one_process_match_the_whole_validation_set():
    assert_union_values(validate_metrics(DeviceParameters.SINGLE_DEVICE()))


def test_metrics_without_torchmetrics_installed_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(ImportError, match=r"pip install 'dream-trainer\[metrics\]'"):
        MetricTrainer(mlp_config()).fit()
