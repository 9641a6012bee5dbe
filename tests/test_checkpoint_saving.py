"""Which checkpoints are written and kept, async saves, interrupts, crashes and corruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.trainer.checkpointing.storage import COMPLETE, complete_checkpoints
from tests.multirank import run_on_ranks
from tests.parity_model import ParityConfig
from tests.test_trainer_parity import RecordingTrainer, full_weights
from tests.trainer_fixtures import caught

REPO = Path(__file__).resolve().parent.parent


def config(run_dir: str, steps: int, params: DeviceParameters | None = None, **checkpoint: Any):
    return ParityConfig(
        seed=7,
        lr=1e-3,
        shuffle=True,
        run_dir=run_dir,
        device_parameters=params or DeviceParameters.FSDP(),
        training_parameters=TrainingParameters(
            n_epochs=4, max_steps=steps, gradient_accumulation_steps=2
        ),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        checkpoint_parameters={"enable": True, **checkpoint},
    )


def fit(run_dir: str, steps: int, **checkpoint: Any) -> dict[str, Any]:
    trainer = RecordingTrainer(config(run_dir, steps, **checkpoint))
    trainer.logged_losses = []
    trainer.fit()
    return {
        "losses": trainer.logged_losses,
        "weights": full_weights(trainer),
        "dir": str(trainer.checkpoint_dir),
    }


def steps_on_disk(directory: str) -> list[int]:
    return [c.step for c in complete_checkpoints(Path(directory))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Rank 0's result of 8 steps on 2 ranks that never stop (or save, or resume): what every
    interrupted 8-step run of this module must equal."""
    run_dir = tmp_path_factory.mktemp("straight")
    (result, _) = run_on_ranks(fit, 2, str(run_dir), 8, resume="never")
    return result


@pytest.mark.parametrize("async_mode", ["off", "thread", "process"])
def test_periodic_checkpoints_keep_the_newest_k_and_resume_the_same_way(
    async_mode, tmp_path, straight
):
    (first, _) = run_on_ranks(
        fit, 2, str(tmp_path), 6, every_n_steps=2, keep_last=2, async_mode=async_mode
    )
    assert steps_on_disk(first["dir"]) == [4, 6]
    assert not list(Path(first["dir"]).glob(".step_*"))  # no partial directory left behind
    (resumed, _) = run_on_ranks(fit, 2, str(tmp_path), 8, async_mode=async_mode)
    assert first["losses"] + resumed["losses"] == straight["losses"]


def test_keep_best_ranks_by_the_monitored_metric_and_never_counts_nan(tmp_path):
    root = tmp_path / "checkpoints"
    from dream_trainer.trainer.checkpointing.storage import commit, prune, step_dir

    for step, loss in [(1, 3.0), (2, float("nan")), (3, 1.0), (4, 2.0), (5, 5.0)]:
        partial = step_dir(root, step, partial=True)
        partial.mkdir(parents=True)
        commit(partial, step_dir(root, step), step, {"val_loss": loss})
    prune(root, keep_last=1, keep_best=2, monitor="val_loss", mode="min")
    assert [c.step for c in complete_checkpoints(root)] == [3, 4, 5]  # best two + newest
    prune(root, keep_last=None, keep_best=1, monitor="val_loss", mode="max")
    assert [c.step for c in complete_checkpoints(root)] == [5]


def test_a_checkpoint_without_its_marker_is_never_resumed(tmp_path):
    (first, _) = run_on_ranks(fit, 2, str(tmp_path), 4, every_n_steps=2)
    newest = Path(first["dir"]) / "step_00000004"
    (newest / COMPLETE).unlink()  # as if the process died between the write and the commit
    (resumed, _) = run_on_ranks(fit, 2, str(tmp_path), 6)
    (straight, _) = run_on_ranks(fit, 2, str(tmp_path / "straight"), 6, resume="never")
    assert resumed["losses"] == straight["losses"][2:]  # resumed from step 2


KILLED_MID_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import dream_trainer.trainer.checkpointing.checkpointer as checkpointer
from dream_trainer.configs import DeviceParameters
from tests.test_checkpoint_saving import config
from tests.test_trainer_parity import RecordingTrainer

commit = checkpointer.commit

def dies_before_committing(partial, final, step, metrics):
    if step == 4:  # step 4's files are written, its directory not yet committed
        os.kill(os.getpid(), signal.SIGKILL)
    commit(partial, final, step, metrics)

checkpointer.commit = dies_before_committing
params = DeviceParameters.SINGLE_DEVICE()
trainer = RecordingTrainer(config({run_dir!r}, 6, params, every_n_steps=2))
trainer.logged_losses = []
trainer.fit()
"""


def fit_single(run_dir: str, steps: int, **checkpoint: Any) -> list[float]:
    trainer = RecordingTrainer(
        config(run_dir, steps, DeviceParameters.SINGLE_DEVICE(), **checkpoint)
    )
    trainer.logged_losses = []
    trainer.fit()
    return trainer.logged_losses


def test_a_process_killed_in_the_middle_of_a_save_resumes_from_the_previous_one(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_SAVE.format(repo=str(REPO), run_dir=str(tmp_path)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    runs = (tmp_path / "dream-trainer" / "run").glob("*/checkpoints")
    (checkpoints,) = [run for run in runs if not run.parent.is_symlink()]  # not `latest`
    assert steps_on_disk(str(checkpoints)) == [2]
    assert (checkpoints / ".step_00000004.partial" / ".metadata").exists()  # written, not committed
    resumed = fit_single(str(tmp_path), 6)  # resume "auto": the newest complete one, step 2
    straight = fit_single(str(tmp_path / "straight"), 6, resume="never")
    assert resumed == straight[2:]
    # The killed run's partial save is never resumed from; the resumed run, a new run
    # directory, leaves the other run's files alone.
    assert (checkpoints / ".step_00000004.partial").exists()


def corrupt_and_resume(run_dir: str, victim: str) -> dict[str, Any]:
    checkpoint = complete_checkpoints(Path(run_dir) / "dream-trainer" / "run")[-1].path
    if int(os.environ.get("RANK", 0)) == 0:
        target = checkpoint / victim
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    torch.distributed.barrier()
    return caught(fit, run_dir, 6)


@pytest.mark.parametrize("victim", [".metadata", "trainer.json", "rank_1.json"])
def test_a_truncated_checkpoint_file_is_named_in_the_error(victim, tmp_path):
    run_on_ranks(fit, 2, str(tmp_path), 2)
    for result in run_on_ranks(corrupt_and_resume, 2, str(tmp_path), victim):
        assert result["error"] == "RuntimeError", result
        assert victim in result["message"] and "truncated or corrupted" in result["message"]


INTERRUPTIBLE = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tests.test_checkpoint_saving import config
from tests.test_trainer_parity import RecordingTrainer

class Slow(RecordingTrainer):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3 and batch_idx % 2 == 0 and self.world.rank == 0:
            open({marker!r}, "w").close()
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)

trainer = Slow(config({run_dir!r}, 1000))
trainer.logged_losses = []
trainer.fit()
"""


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    marker = tmp_path / "marker"
    script = tmp_path / "slow.py"
    script.write_text(
        INTERRUPTIBLE.format(repo=str(REPO), marker=str(marker), run_dir=str(tmp_path))
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[0]
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    output = process.communicate(timeout=120)[0]
    steps = steps_on_disk(str(next((tmp_path / "dream-trainer" / "run").glob("*/checkpoints"))))
    assert steps and 3 <= steps[-1] <= 6, output  # saved right after the step that saw it
    assert "SIGTERM received: saving a checkpoint" in output


RESTARTABLE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from dream_trainer.trainer.callback import Callback
from tests.test_checkpoint_saving import config
from tests.test_trainer_parity import RecordingTrainer, full_weights

class Crashing(RecordingTrainer):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5 and self.world.rank == 1 and not os.path.exists({marker!r}):
            open({marker!r}, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, once
        return super().training_step(batch, batch_idx)

class SaveResult(Callback):
    # post_fit runs while the process group still exists (fit destroys it afterwards).
    def post_fit(self):
        weights = full_weights(self.trainer)
        if self.trainer.world.rank == 0:
            torch.save({{"losses": self.trainer.logged_losses, "weights": weights}}, {out!r})

trainer = Crashing(config({run_dir!r}, 8, every_n_steps=2), callbacks=[SaveResult()])
trainer.logged_losses = []
trainer.fit()
"""


def test_a_killed_rank_restarts_the_job_which_resumes_from_the_last_checkpoint(tmp_path, straight):
    out, marker = tmp_path / "result.pt", tmp_path / "killed"
    script = tmp_path / "crashing.py"
    script.write_text(
        RESTARTABLE.format(repo=str(REPO), marker=str(marker), run_dir=str(tmp_path), out=str(out))
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--max-restarts=1", str(script)]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert marker.exists()  # it did crash once
    restarted = torch.load(out, weights_only=True)
    assert restarted["losses"] == straight["losses"][4:]  # the restart resumed after step 4
    for name, value in straight["weights"].items():
        assert torch.equal(restarted["weights"][name], value), name
