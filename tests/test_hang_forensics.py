"""Hang forensics: every group gets the train timeout, and a hung job names the rank behind.

* Unit tests of the report on fake records (no process group), the progress record, the store
  board on a HashStore and the watchdog thread with a fake exit.
* On 2 fresh CPU ranks: after setup every process group the run made (default, mesh, CPU and
  the checkpointer's group) has the configured train timeout, and the watchdog thread runs
  during fit and is gone after it.
* The acceptance test: a 2-rank torchrun job in which rank 1 sleeps inside ``training_step`` for
  far longer than a 5 s train timeout exits non-zero within seconds of the timeout and reports
  rank 1, its step and phase ``forward-backward`` as the rank that did not arrive.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist
from pydantic import ValidationError

from dream_trainer.configs import CheckpointParameters, DeviceParameters
from dream_trainer.configs.device import CommParameters
from dream_trainer.trainer import Callback
from dream_trainer.world.group_timeouts import group_label, group_timeouts
from dream_trainer.world.hang_report import format_report, ranks_behind
from dream_trainer.world.process_groups import registered_groups
from dream_trainer.world.progress import Phase, Progress
from dream_trainer.world.rank_records import RankRecord, RecordBoard
from dream_trainer.world.watchdog import EXIT_CODE, HangWatchdog, looks_like_collective_failure
from tests.multirank import _RDZV_VARS, REPO_ROOT, _kill_tree, run_with_fresh_ranks
from tests.trainer_fixtures import MLPTrainer, mlp_config

NOW = 1_000_000.0


def record(rank: int, step: int = 2, phase: str = "forward-backward", **kw: Any) -> RankRecord:
    fields: dict[str, Any] = {"entered": NOW - 6.0, "heartbeat": NOW - 0.5}
    fields.update(kw)
    return RankRecord(rank=rank, step=step, phase=phase, **fields)


# ------------------------------------------------------------------ the report on fake records


def test_the_rank_with_fewer_collectives_on_a_group_is_the_one_that_did_not_arrive():
    records = {
        0: record(0, collectives={"0": 7, "1": 3}, groups={"1": "mesh_dp_shard"}),
        1: record(1, collectives={"0": 6, "1": 3}),
    }
    behind = ranks_behind(records, 2, NOW, stale_after=5.0)
    assert [b.rank for b in behind] == [1]
    assert "issued 6 collective(s) on group 0, rank(s) 0 issued 7" in behind[0].reason
    text = format_report(
        rank=0,
        reason="a collective failed: RuntimeError: Timed out waiting 5000ms",
        own=records[0],
        records=records,
        world_size=2,
        now=NOW,
        stale_after=5.0,
        extra=["flight recorder: off"],
    )
    assert text.splitlines()[0] == (
        "hang report from rank 0: a collective failed: RuntimeError: Timed out waiting 5000ms"
    )
    assert "did not arrive: rank 1 (step 2, phase forward-backward, 6.0 s in it)" in text
    assert "rank(s) 0-1: step 2, phase forward-backward" in text
    assert text.rstrip().endswith("flight recorder: off")


def test_a_group_is_named_with_its_description_and_only_its_members_are_compared():
    records = {  # ranks 0,1 share group "3" (tp), ranks 2,3 share group "4"
        0: record(0, collectives={"3": 5}, groups={"3": "mesh_tp"}),
        1: record(1, collectives={"3": 4}, groups={"3": "mesh_tp"}),
        2: record(2, collectives={"4": 9}),
        3: record(3, collectives={"4": 9}),
    }
    (behind,) = ranks_behind(records, 4, NOW, stale_after=5.0)
    assert behind.rank == 1
    assert "on group 3 (mesh_tp), rank(s) 0 issued 5" in behind.reason


def test_a_lower_step_decides_before_collective_counts():
    records = {0: record(0, step=3, collectives={"0": 9}), 1: record(1, collectives={"0": 9})}
    (behind,) = ranks_behind(records, 2, NOW, stale_after=5.0)
    assert (behind.rank, behind.reason) == (1, "it is at step 2 while rank(s) 0 reached step 3")


def test_a_missing_or_stale_record_is_reported_first():
    records = {
        0: record(0, step=5),
        2: record(2, heartbeat=NOW - 40.0),
        3: record(3, step=9),
    }
    behind = ranks_behind(records, 4, NOW, stale_after=5.0)
    assert [b.rank for b in behind] == [1, 2]
    assert "published no record" in behind[0].reason and behind[0].record is None
    assert "its last record is 40 s old" in behind[1].reason


def test_a_phase_most_ranks_are_not_in_singles_out_a_rank():
    records = {r: record(r, phase="data" if r == 2 else "optimizer") for r in range(4)}
    (behind,) = ranks_behind(records, 4, NOW, stale_after=5.0)
    assert behind.rank == 2 and "phase 'data' while most ranks are in 'optimizer'" in behind.reason


def test_when_every_rank_is_in_the_same_place_no_rank_stands_out():
    records = {r: record(r, collectives={"0": 4}) for r in range(3)}
    assert ranks_behind(records, 3, NOW, stale_after=5.0) == []
    text = format_report(
        rank=0,
        reason="r",
        own=records[0],
        records=records,
        world_size=3,
        now=NOW,
        stale_after=5.0,
    )
    assert "did not arrive: no rank stands out (all at step 2, phase forward-backward)" in text


def test_many_ranks_behind_are_listed_as_ranges():
    records = {r: record(r, step=1 if r % 2 else 2) for r in range(40)}
    text = format_report(
        rank=0, reason="r", own=records[0], records=records, world_size=40, now=NOW, stale_after=5
    )
    assert text.count("did not arrive: rank ") == 16
    assert "did not arrive: also rank(s) 33,35,37,39" in text
    assert "rank(s) 0,2,4,6" in text  # the ranks at step 2, in the summary


# ------------------------------------------------------- records, store board, progress, config


def test_a_record_round_trips_through_bytes_and_a_store():
    store = dist.HashStore()
    boards = [RecordBoard(store, rank, 3) for rank in range(3)]
    mine = record(0, collectives={"0": 3}, groups={"0": "default_pg"}, marks=12)
    boards[0].publish(mine)
    boards[2].publish(record(2, step=1))
    found = boards[1].read_all()
    assert sorted(found) == [0, 2]  # rank 1 never published
    assert found[0] == mine
    boards[0].clear()
    assert sorted(boards[1].read_all()) == [2]


def test_progress_marks_phases_cheaply_and_remembers_which_it_finished():
    progress = Progress()
    assert progress.position.phase == Phase.SETUP
    progress.mark(Phase.DATA, 4)
    with progress.during(Phase.OPTIMIZER):
        assert (progress.position.step, progress.position.phase) == (4, Phase.OPTIMIZER)
    assert progress.position.phase == Phase.DATA
    assert progress.has_finished(Phase.OPTIMIZER) and not progress.has_finished(Phase.CHECKPOINT)
    seen = []
    for item in progress.each("ab", Phase.VALIDATION):
        seen.append((item, progress.position.phase))
        progress.mark(Phase.FORWARD_BACKWARD)
    assert seen == [("a", Phase.VALIDATION), ("b", Phase.VALIDATION)]
    assert progress.position.phase == Phase.VALIDATION  # marked before the end was found
    marks = progress.position.marks
    start = time.perf_counter()
    for _ in range(10_000):
        progress.mark(Phase.DATA)
    per_mark = (time.perf_counter() - start) / 10_000
    assert progress.position.marks == marks + 10_000
    assert per_mark < 20e-6  # a few hundred ns on the dev machine; no sync, no collective


def test_a_non_positive_hang_timeout_is_refused_with_the_fix():
    with pytest.raises(ValidationError, match="hang_timeout_seconds must be a positive number"):
        CommParameters(hang_timeout_seconds=0)
    assert CommParameters(train_timeout_seconds=7).effective_hang_timeout_seconds == 7
    assert CommParameters(hang_timeout_seconds=3).effective_hang_timeout_seconds == 3


def test_collective_failures_are_told_from_other_errors():
    assert looks_like_collective_failure(
        RuntimeError("[gloo] Timed out waiting 5000ms for recv operation to complete")
    )
    assert looks_like_collective_failure(dist.DistBackendError("NCCL watchdog"))
    assert not looks_like_collective_failure(ValueError("timeout"))
    assert not looks_like_collective_failure(RuntimeError("shapes do not match"))


# ---------------------------------------------------------------- the watchdog thread, in process


def test_the_watchdog_reports_a_rank_without_progress_then_ends_the_process(tmp_path):
    progress = Progress()
    progress.mark(Phase.FORWARD_BACKWARD, 1)
    progress.mark(Phase.DATA)
    progress.mark(Phase.FORWARD_BACKWARD, 2)  # a phase it finished before: the hang timeout
    exits: list[int] = []
    store = dist.HashStore()
    RecordBoard(store, 1, 2).publish(record(1, step=3, heartbeat=time.time()))
    watchdog = HangWatchdog(
        0,
        2,
        progress,
        hang_timeout=0.4,
        first_run_timeout=60.0,
        board=RecordBoard(store, 0, 2),
        groups=list,
        report_dir=tmp_path,
        interval=0.05,
        grace=0.1,
        exit_process=exits.append,
    ).start()
    deadline = time.monotonic() + 10.0
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [EXIT_CODE]
    assert watchdog.fired and not watchdog.running
    text = watchdog.report_text or ""
    assert "hang report from rank 0: no progress for" in text
    assert "at step 2 in phase forward-backward (the hang timeout is 0.4 s)" in text
    assert "did not arrive: rank 0 (step 2, phase forward-backward" in text  # rank 1 is ahead
    saved = json.loads((tmp_path / "rank_0.json").read_text())
    assert saved["behind"][0]["rank"] == 0 and saved["report"] == text
    assert "most recent call first" in (tmp_path / "rank_0.stacks").read_text()
    assert watchdog.report("again") is None  # one report per watchdog


def test_a_first_run_and_checkpoints_get_the_longer_limit_and_stop_ends_the_thread():
    progress = Progress()
    progress.mark(Phase.FORWARD_BACKWARD, 0)  # never finished: a compiling first step
    exits: list[int] = []
    watchdog = HangWatchdog(
        0, 2, progress, hang_timeout=0.1, first_run_timeout=60.0, interval=0.02,
        exit_process=exits.append,
    ).start()  # fmt: skip
    time.sleep(0.4)
    assert watchdog.running and not exits
    watchdog.stop()
    assert not watchdog.running and not exits
    for phase in (Phase.CHECKPOINT, Phase.DATA, Phase.FORWARD_BACKWARD):
        progress.mark(phase)  # checkpoint and data finished once now
    # A second data wait gets the hang timeout; a checkpoint save keeps the long limit.
    assert (watchdog._limit(Phase.DATA), watchdog._limit(Phase.CHECKPOINT)) == (0.1, 60.0)
    assert not [t for t in threading.enumerate() if "hang-watchdog" in t.name]


def test_a_teardown_during_the_grace_period_cancels_the_exit():
    progress = Progress()
    exits: list[int] = []
    watchdog = HangWatchdog(
        0, 2, progress, hang_timeout=0.1, interval=0.02, grace=30.0, exit_process=exits.append
    ).start()
    deadline = time.monotonic() + 10.0
    while not watchdog.report_text and time.monotonic() < deadline:  # "" while it is written
        time.sleep(0.02)
    assert watchdog.fired
    started = time.monotonic()
    watchdog.stop(clean=False)  # what the trainer's teardown does after a failure
    assert time.monotonic() - started < 5.0 and not watchdog.running and exits == []


# ---------------------------------------------------- on 2 fresh ranks: timeouts and the thread


class WatchProbe(Callback[Any]):
    """Records every group's timeout and the live watchdog threads at ``pre_fit``."""

    def pre_fit(self) -> None:
        self.timeouts = {
            group_label(g): [t.total_seconds() for t in group_timeouts(g)]
            for g in registered_groups()
        }
        self.threads = sorted(t.name for t in threading.enumerate() if "hang-watchdog" in t.name)


def fit_and_read_timeouts(run_dir: str) -> dict[str, Any]:
    probe = WatchProbe()
    comm = {"init_timeout_seconds": 77, "train_timeout_seconds": 13}
    config = mlp_config(
        DeviceParameters.FSDP(comm=comm),
        checkpoint_parameters=CheckpointParameters(enable=True),
        run_dir=run_dir,
    )
    trainer = MLPTrainer(config, callbacks=[probe])
    trainer.fit()
    return {
        "timeouts": probe.timeouts,
        "threads": probe.threads,
        "after": [t.name for t in threading.enumerate() if "hang-watchdog" in t.name],
        "steps": trainer.global_step,
    }


@pytest.mark.multirank
def test_every_group_of_the_run_has_the_train_timeout_and_the_watchdog_ends_with_fit(tmp_path):
    results = run_with_fresh_ranks(fit_and_read_timeouts, 2, str(tmp_path), timeout=120)
    for rank, result in enumerate(results):
        timeouts = result["timeouts"]
        assert result["steps"] == 2
        # default group, the mesh groups of size 1 (pp, dp_replicate, cp, tp), the checkpointer's
        descs = {label.partition(" ")[2] for label in timeouts}
        assert {"(default_pg)", "(mesh_pp)", "(mesh_dp_replicate)", "(mesh_cp)"} <= descs
        assert {"(mesh_tp)", "(checkpointer)"} <= descs, timeouts
        assert all(values == [13.0] for values in timeouts.values()), (rank, timeouts)
        assert result["threads"] == [f"dream-trainer-hang-watchdog-rank{rank}"]
        assert result["after"] == []


# ------------------------------------------------------------------------- the acceptance test

HUNG_JOB = """
import sys
import time

from dream_trainer.configs import DeviceParameters
from tests.trainer_fixtures import MLPTrainer, mlp_config

TIMEOUT = float(sys.argv[1])


class SleepyTrainer(MLPTrainer):
    def training_step(self, batch, batch_idx):
        if self.world.rank == 1 and self.global_step == 2:
            print(f"rank 1 sleeps at {time.time():.3f}", flush=True)
            time.sleep(120)
        return super().training_step(batch, batch_idx)


comm = {"train_timeout_seconds": TIMEOUT, "flight_recorder_buffer_size": 64}
config = mlp_config(
    DeviceParameters.DDP(comm=comm),
    training={"n_epochs": 1, "train_steps_per_epoch": 4},
    run_dir=sys.argv[2],
)
SleepyTrainer(config).fit()
"""


@pytest.mark.multirank
def test_a_rank_that_sleeps_in_training_step_is_named_and_the_job_fails_fast(tmp_path):
    timeout = 5.0
    script = tmp_path / "hung_job.py"
    script.write_text(textwrap.dedent(HUNG_JOB))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), str(timeout), str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if k not in _RDZV_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    started = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"the hung job did not end within 120 s:\n{out[-4000:]}")
    ended = time.time()
    assert proc.returncode != 0, out[-4000:]
    slept = re.search(r"rank 1 sleeps at (\d+\.\d+)", out)
    assert slept, out[-4000:]
    took = ended - float(slept.group(1))
    # The timeout, then the report, teardown and torchrun stopping rank 1 (~1-2 s measured).
    assert took < timeout + 15, f"the job took {took:.1f} s after the hang began\n{out[-4000:]}"
    assert "did not arrive: rank 1 (step 2, phase forward-backward" in out, out[-6000:]
    reports = sorted((tmp_path / "runs").rglob("hang_reports/rank_*.json"))
    assert reports, out[-4000:]
    for path in reports:
        assert [b["rank"] for b in json.loads(path.read_text())["behind"]] == [1], path
    assert re.search(r"flight recorder: \d+ entries written to .*fr_trace_rank_", out), out[-4000:]
    print(
        f"exit {proc.returncode}: {took:.1f} s after the hang began, {ended - started:.1f} s in all"
    )
