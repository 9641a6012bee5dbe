"""Performance metrics and the start-up summary in real runs: one process and 2 gloo ranks."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dream_trainer.configs import DeviceParameters, LoggingParameters
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPTrainer, mlp_config

pytestmark = pytest.mark.multirank

PERF_KEYS = {
    "train/step_time_s",
    "train/samples_per_s",
    "train/samples_per_s_per_device",
    "train/tokens_per_s",
    "train/tokens_per_s_per_device",
    "train/data_wait_fraction",
    "train/data_wait_fraction_max",
    "memory/peak_rss_gib",
    "memory/peak_rss_gib_mean",
}
RANK_KEYS = {
    "ranks/step_time_min_s",
    "ranks/step_time_max_s",
    "ranks/step_time_spread",
    "ranks/busy_fraction_min",
    "ranks/busy_fraction_mean",
}


class MeasuredMLP(MLPTrainer):
    """The MLP regression with the performance metrics (on by default); every sample counts 5
    tokens."""

    def tokens_in_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return 5 * batch["x"].shape[0]

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged.append((step, metrics))


def test_one_process_logs_throughput_and_memory_to_jsonl(tmp_path):
    config = mlp_config(
        logging=LoggingParameters(backends=["jsonl"], log_every_n_steps=2),
        training={"n_epochs": 1, "train_steps_per_epoch": 4, "gradient_accumulation_steps": 2},
        train_size=32,
        run_dir=str(tmp_path),
    )
    trainer = MeasuredMLP(config)
    trainer.logged = []
    trainer.fit()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train] == [2, 4]
    for line in train:
        assert set(line) >= PERF_KEYS, sorted(set(line))
        assert not any(k.startswith("ranks/") for k in line)  # one rank: nothing to compare
        assert not any(k in line for k in ("train/mfu", "train/tflops_per_device"))  # no FLOPs
        # 2 steps x 2 micro-batches x 4 samples in the window, in 2 * step_time_s seconds.
        assert line["train/samples_per_s"] * 2 * line["train/step_time_s"] == pytest.approx(16)
        assert line["train/tokens_per_s"] == pytest.approx(5 * line["train/samples_per_s"])
        assert 0 <= line["train/data_wait_fraction"] <= 1
        assert 0 < line["memory/peak_rss_gib"] < 64


class FlopsMLP(MeasuredMLP):
    def flops_per_token(self) -> float:
        return 1e6


def test_tflops_without_a_known_peak_gives_no_mfu(tmp_path):
    config = mlp_config(
        logging=LoggingParameters(backends=[], log_every_n_steps=1), run_dir=str(tmp_path)
    )
    trainer = FlopsMLP(config)
    trainer.logged = []
    trainer.fit()
    metrics = trainer.logged[0][1]
    expected = 1e6 * metrics["train/tokens_per_s_per_device"] / 1e12
    assert metrics["train/tflops_per_device"] == pytest.approx(expected)
    assert "train/mfu" not in metrics  # the CPU has no peak in the table


# ------------------------------------------------------------------ rank balance


class SleepyMLP(MeasuredMLP):
    """Each rank sleeps ``sleep_s[rank]`` per step and steps without gradients.

    No backward: under DDP the gradient all-reduce inside the step would make the fast rank
    wait there, where the host sees it as busy (see rank_balance.py); without it the fast rank
    waits at the log barrier, where the balance check sees it.
    """

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        time.sleep(self.sleep_s[dist.get_rank()])
        with torch.no_grad():
            loss = self.loss(batch)
        self.step(self.optimizer)
        return {"loss": loss}


def run_sleepy(sleep_s: list[float]) -> dict[str, Any]:
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dream_trainer.metrics")
    logger.addHandler(handler)
    config = mlp_config(
        DeviceParameters.DDP(),
        logging=LoggingParameters(backends=[], log_every_n_steps=3),
        training={"n_epochs": 1, "train_steps_per_epoch": 9},
        train_size=9 * 4,
    )
    trainer = SleepyMLP(config)
    trainer.logged, trainer.sleep_s = [], sleep_s
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
    train = [m for _, m in trainer.logged if "train/loss" in m]
    return {"warnings": messages, "metrics": train}


def test_a_rank_three_times_slower_is_named_by_the_spread_warning():
    rank0, rank1 = run_on_ranks(run_sleepy, 2, [0.04, 0.12], timeout=120)
    assert rank1["warnings"] == []  # rank 0 warns; every rank has the same numbers
    assert len(rank0["warnings"]) == 1, rank0["warnings"]  # 3 windows, once per 10 windows
    warning = rank0["warnings"][0]
    assert warning.startswith("step 3: ranks are unevenly loaded: rank 1 took "), warning
    assert "rank 0 was busy only" in warning
    assert rank0["metrics"] == rank1["metrics"]  # reduced: the same on every rank
    for metrics in rank0["metrics"]:
        assert set(metrics) >= RANK_KEYS | PERF_KEYS
        assert 2.0 < metrics["ranks/step_time_spread"] < 4.0
        assert metrics["ranks/busy_fraction_min"] < 0.5
        assert metrics["ranks/step_time_max_s"] >= 0.12
        assert metrics["train/step_time_s"] >= 0.12  # the job's pace is the slow rank's


def test_balanced_ranks_give_no_warning():
    rank0, rank1 = run_on_ranks(run_sleepy, 2, [0.06, 0.06], timeout=120)
    assert rank0["warnings"] == rank1["warnings"] == []
    for metrics in rank0["metrics"]:
        assert metrics["ranks/step_time_spread"] < 1.5
        assert metrics["ranks/busy_fraction_min"] > 0.6


# ------------------------------------------------------------------ start-up summary


class PartlyFrozenMLP(MLPTrainer):
    """The MLP (4 -> 8 -> 3) with the second layer's bias frozen."""

    def configure_models(self) -> None:
        super().configure_models()
        self.model.layers[1].bias.requires_grad_(False)


def summary_under_fsdp() -> dict[str, Any]:
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dream_trainer.metrics")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    config = mlp_config(
        DeviceParameters.FSDP(),
        training={"n_epochs": 1, "gradient_accumulation_steps": 2, "max_steps": 1},
        train_size=16,
    )
    trainer = PartlyFrozenMLP(config)
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {"summary": trainer.startup_summary, "logged": lines}


def test_startup_summary_counts_parameters_and_fsdp_shards_by_hand():
    rank0, rank1 = run_on_ranks(summary_under_fsdp, 2, timeout=120)
    summary = rank0["summary"]
    assert summary == rank1["summary"]
    model = summary.models["model"]
    # Linear(4, 8): 32 + 8; Linear(8, 3): 24 + 3 -> 67, of which the frozen bias is 3.
    assert (model.parameters, model.trainable) == (67, 64)
    # FSDP2 splits dim 0 in chunks of ceil(rows / 2): weight0 (8, 4) -> 4 + 4 rows, bias0
    # 4 + 4, weight1 (3, 8) -> 2 + 1 rows, bias1 2 + 1.
    assert model.local_elements == [4 * 4 + 4 + 2 * 8 + 2, 4 * 4 + 4 + 1 * 8 + 1] == [38, 29]
    assert model.local_bytes == [38 * 4, 29 * 4]
    # global_batch 4 over 2 ranks; 16 samples -> 8 per rank -> 4 batches; 2 per step.
    assert summary.batch_size == 2 and summary.batches_per_rank == [4, 4]
    assert summary.samples_per_step == 2 * 2 * 2
    assert summary.steps_per_epoch == 2
    assert rank1["logged"] == []  # rank 0 logs it
    assert rank0["logged"] == [summary.describe()]
    assert summary.describe() == "\n".join(
        [
            "start-up summary",
            "model    parameters     trainable  local shard per rank (elements)",
            "model            67            64  rank 0: 38, rank 1: 29",
            "placement of model (rank 0):",
            "  layers.*.weight  dp_shard_cp=Shard(0)",
            "  layers.*.bias    dp_shard_cp=Shard(0)",
            "training data: 2 samples per micro-batch per rank x 2 data-parallel ranks x 2 "
            "micro-batches per step = 8 samples per optimizer step; 4 batches per rank per "
            "epoch -> 2 steps per epoch",
        ]
    )
