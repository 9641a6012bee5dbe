"""wandb runs that continue across a resume, the TensorBoard sink, and metric names that differ
between data-parallel ranks (an error on every rank, never a hang)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dream_trainer.configs import LoggingParameters
from dream_trainer.trainer.reduce import MetricKeysMismatchError, weighted_mean_across
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPTrainer, mlp_config


def _jsonl(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def _fit(root: Path, max_steps: int, backends: list[Any]) -> MLPTrainer:
    config = mlp_config(
        logging=LoggingParameters(backends=backends, wandb_mode="offline", log_every_n_steps=1),
        training={"n_epochs": 1, "train_steps_per_epoch": 4, "max_steps": max_steps},
        checkpoint_parameters={"enable": True, "resume": "auto"},
        run_dir=str(root),
        project="p",
        experiment="e",
    )
    trainer = MLPTrainer(config)
    trainer.fit()
    return trainer


def test_a_resumed_run_continues_the_same_wandb_run_and_logs_the_jsonl_values(
    tmp_path, monkeypatch
):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the sink's dir must win
    passed: list[tuple[str, dict[str, float], int]] = []  # (run id, metrics, step) to run.log
    real_init = wandb.init

    def recording_init(**kwargs: Any) -> Any:
        run = real_init(**kwargs)
        real_log = run.log

        def log(metrics: dict[str, float], step: int) -> None:
            passed.append((run.id, dict(metrics), step))
            real_log(metrics, step=step)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    first = _fit(tmp_path, 2, ["jsonl", "wandb"])
    second = _fit(tmp_path, 4, ["jsonl", "wandb"])
    assert second.global_step == 4 and first.run_dir != second.run_dir
    saved = json.loads(next(first.checkpoint_dir.glob("step_*/trainer.json")).read_text())
    run_id = saved["wandb_run_id"]
    assert run_id and first.wandb_run_id == second.wandb_run_id == run_id
    offline = sorted(p.name for p in tmp_path.rglob("offline-run-*") if p.is_dir())
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline
    assert {p.parent.parent for p in tmp_path.rglob("offline-run-*")} == {
        first.run_dir,
        second.run_dir,
    }
    assert {rid for rid, _, _ in passed} == {run_id}
    logged = [{"step": step, **metrics} for _, metrics, step in passed]
    assert logged == _jsonl(first.run_dir) + _jsonl(second.run_dir)
    assert [x["step"] for x in logged] == [1, 2, 2, 3, 4, 4]  # train, train, val per run
    assert all("train/loss" in x or "val_loss" in x for x in logged)
    # And the values reach the offline run files (written by wandb's service process).
    wanted = [(k, json.dumps(v)) for x in logged[3:] for k, v in x.items() if k != "step"]
    missing = wanted
    deadline = time.monotonic() + 10.0
    while missing and time.monotonic() < deadline:
        files = list(second.run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        data = files[0].read_bytes() if len(files) == 1 else b""
        missing = [(k, v) for k, v in wanted if not (k.encode() in data and v.encode() in data)]
        time.sleep(0.1 if missing else 0)
    assert not missing


def test_no_wandb_run_starts_before_the_first_log_and_none_without_wandb(tmp_path):
    trainer = _fit(tmp_path, 1, ["jsonl"])
    assert trainer.wandb_run_id is None
    saved = json.loads(next(trainer.checkpoint_dir.glob("step_*/trainer.json")).read_text())
    assert saved["wandb_run_id"] is None


# ------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'dream-trainer[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _fit(tmp_path, 2, ["jsonl", "tensorboard"])
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    read = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in _jsonl(trainer.run_dir):
        for key, value in line.items():
            if key != "step":
                expected.setdefault(key, []).append((line["step"], value))
    assert sorted(read) == sorted(expected)
    assert {"train/loss", "val_loss"} <= set(read)
    for tag, points in expected.items():
        assert [s for s, _ in read[tag]] == [s for s, _ in points]
        assert [v for _, v in read[tag]] == pytest.approx([v for _, v in points], rel=1e-6)


def test_tensorboard_backend_without_tensorboard_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = mlp_config(logging=LoggingParameters(backends=["tensorboard"]))
    with pytest.raises(ImportError, match=r"pip install 'dream-trainer\[tensorboard\]'"):
        MLPTrainer(config).fit()


# ------------------------------------------------------------------ mismatched metric keys


def reduce_with_rank_dependent_keys() -> list[str]:
    """Rank 1 has an extra key, then both agree; returns what each call did on this rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    one = torch.tensor(1.0)
    outcomes = []
    cases: list[dict[str, torch.Tensor]] = [
        {"loss": one} if rank == 0 else {"loss": one, "extra": one},
        {} if rank == 0 else {"loss": one},  # an empty side must not return before the check
        {"loss": one * (rank + 1), "aux": one},
    ]
    for sums in cases:
        try:
            outcomes.append(repr(weighted_mean_across(sums, torch.tensor(1.0), mesh)))
        except MetricKeysMismatchError as error:
            outcomes.append(str(error))
    return outcomes


@pytest.mark.multirank
def test_metric_names_that_differ_between_ranks_raise_on_every_rank_naming_them():
    start = time.monotonic()
    rank0, rank1 = run_on_ranks(reduce_with_rank_dependent_keys, 2, timeout=30.0)
    assert time.monotonic() - start < 20.0
    for outcomes in (rank0, rank1):
        assert "rank 0 lacks ['extra'] (it has ['loss'])" in outcomes[0]
        assert "rank 1" not in outcomes[0]
        assert "rank 0 lacks ['loss'] (it has [])" in outcomes[1]
        assert outcomes[2] == repr({"aux": 1.0, "loss": 1.5})
    assert rank0 == rank1


def test_one_rank_needs_no_key_check():
    mesh = None
    assert weighted_mean_across({"a": torch.tensor(2.0)}, torch.tensor(2.0), mesh) == {"a": 1.0}
    assert weighted_mean_across({}, torch.tensor(1.0), mesh) == {}


def test_step_results_check_each_micro_batch_and_sum_only_when_read() -> None:
    from dream_trainer.trainer.reduce import StepResults

    results = StepResults()
    loss = torch.tensor(1.5, requires_grad=True) * 2  # has a graph: kept detached
    results.add({"loss": loss, "count": 2})
    results.add({"loss": torch.tensor([0.5]), "count": 3.0})
    sums = results.sums(torch.device("cpu"))
    assert {k: v.item() for k, v in sums.items()} == {"loss": 3.5, "count": 5.0}
    assert all(
        v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in sums.values()
    )
    results.clear()
    assert results.sums(torch.device("cpu")) == {}
    with pytest.raises(ValueError, match=r"metric 'loss' has shape \(2,\); step results must be"):
        results.add({"loss": torch.ones(2)})
    with pytest.raises(TypeError, match="metric 'name' is a str; return tensors or numbers"):
        results.add({"name": "x"})
