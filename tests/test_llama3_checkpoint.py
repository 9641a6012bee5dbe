"""The flagship as a user runs it: killed after a checkpoint, rerun with ``resume auto``.

Each run is ``examples/llama3/train.py --config debug`` on its embedded corpus, started the way
the README starts it, and compared on the ``train/loss`` it writes to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multirank import REPO_ROOT

TRAIN = str(REPO_ROOT / "examples" / "llama3" / "train.py")
CHECKPOINTED = [
    "--config", "debug",
    "--training_parameters.max_steps", "20",
    "--checkpoint_parameters.enable", "true",
    "--checkpoint_parameters.every_n_steps", "10",
]  # fmt: skip

if sys.platform != "linux":
    pytestmark = pytest.mark.skip(reason="kills process groups with Linux signals")


def command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", TRAIN, *args]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run(cwd: Path, nproc: int, *args: str) -> None:
    result = subprocess.run(
        command(nproc, *args), cwd=cwd, env=environment(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def run_and_kill_after_checkpoint(cwd: Path, nproc: int, step: int, *args: str) -> None:
    """Start a run and SIGKILL it (launcher and workers) once step ``step``'s checkpoint is done."""
    process = subprocess.Popen(
        command(nproc, *args), cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    marker = f"runs/llama3/debug/*/checkpoints/step_{step:08d}/COMPLETE.json"
    deadline = time.monotonic() + 300
    try:
        while not list(cwd.glob(marker)):
            if process.poll() is not None:
                raise AssertionError(f"the run ended before it was killed:\n{process.stderr}")
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    later = f"runs/llama3/debug/*/checkpoints/step_{20:08d}"
    assert not list(cwd.glob(later)), "killed too late: the run had already finished"


def losses(cwd: Path) -> dict[int, float]:
    """train/loss by step, over every run of the experiment (a resumed run is a new run)."""
    found: dict[int, float] = {}
    for path in sorted(cwd.glob("runs/llama3/debug/*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "train/loss" in row:
                found[row["step"]] = row["train/loss"]
    return found


def test_a_killed_run_resumed_with_auto_logs_the_same_step_20_loss(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    run(straight, 1, *CHECKPOINTED)
    run_and_kill_after_checkpoint(interrupted, 1, 10, *CHECKPOINTED)
    assert 20 not in losses(interrupted)
    run(interrupted, 1, *CHECKPOINTED, "--checkpoint_parameters.resume", "auto")
    expected, resumed = losses(straight), losses(interrupted)
    assert resumed[20] == expected[20]  # bitwise: one process, fp32, the same batches
    assert resumed[10] == expected[10]


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process_with_the_global_batch_kept(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    run(straight, 2, *CHECKPOINTED)  # debug: FSDP over 2 ranks, batch_size 8 per rank
    run_and_kill_after_checkpoint(interrupted, 2, 10, *CHECKPOINTED)
    # One process reads the sharded checkpoint and takes 16 sequences per step: the same global
    # batch, so it continues from the next unseen sample of the same global order.
    run(
        interrupted,
        1,
        *CHECKPOINTED,
        "--batch_size",
        "16",
        "--checkpoint_parameters.resume",
        "auto",
    )
    expected, resumed = losses(straight), losses(interrupted)
    assert resumed[10] == expected[10]  # logged by the 2-rank run before it was killed
    # Other ranks, other reduction order: equal to float32 rounding, not bitwise.
    assert resumed[20] == pytest.approx(expected[20], rel=1e-5, abs=1e-5)
