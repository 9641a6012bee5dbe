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
# Killed after the middle checkpoint, where warmup ends and the cosine decay begins (as step 10
# of 20 is with the preset's 10 warmup steps): a scheduler resumed wrongly shows in the last loss.
STEPS, MIDDLE = 8, 4
CHECKPOINTED = [
    "--config", "debug",
    "--warmup_steps", str(MIDDLE),
    "--training_parameters.max_steps", str(STEPS),
    "--checkpoint_parameters.enable", "true",
    "--checkpoint_parameters.every_n_steps", str(MIDDLE),
    "--logging_parameters.log_every_n_steps", str(MIDDLE),
    "--sample_tokens", "0",  # the text sampled after training is not what is tested here
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


def start(cwd: Path, nproc: int, *args: str) -> subprocess.Popen[str]:
    """Start a run whose output goes to ``cwd/output.log``; ``finish`` waits for it."""
    with (cwd / "output.log").open("w") as log:
        return subprocess.Popen(
            command(nproc, *args), cwd=cwd, env=environment(), stdout=log,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip


def finish(process: subprocess.Popen[str], cwd: Path) -> None:
    try:
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = (cwd / "output.log").read_text()
    assert process.returncode == 0, output[-5000:]


def run(cwd: Path, nproc: int, *args: str) -> None:
    finish(start(cwd, nproc, *args), cwd)


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
    later = f"runs/llama3/debug/*/checkpoints/step_{STEPS:08d}"
    assert not list(cwd.glob(later)), "killed too late: the run had already finished"


def beside_the_killed_run(straight: Path, interrupted: Path, nproc: int) -> None:
    """The uninterrupted run in ``straight`` and the one killed after the middle checkpoint in
    ``interrupted``, at the same time: they are independent, and much of a run is spent on one
    core (starting up, writing checkpoints, tearing down)."""
    uninterrupted = start(straight, nproc, *CHECKPOINTED)
    try:
        run_and_kill_after_checkpoint(interrupted, nproc, MIDDLE, *CHECKPOINTED)
    except BaseException:
        os.killpg(uninterrupted.pid, signal.SIGKILL)
        uninterrupted.wait()
        raise
    finish(uninterrupted, straight)


def losses(cwd: Path) -> dict[int, float]:
    """train/loss by step, over every run of the experiment (a resumed run is a new run)."""
    found: dict[int, float] = {}
    for path in sorted(cwd.glob("runs/llama3/debug/*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "train/loss" in row:
                found[row["step"]] = row["train/loss"]
    return found


def test_a_killed_run_resumed_with_auto_logs_the_same_last_loss(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    beside_the_killed_run(straight, interrupted, 1)
    assert STEPS not in losses(interrupted)
    run(interrupted, 1, *CHECKPOINTED, "--checkpoint_parameters.resume", "auto")
    expected, resumed = losses(straight), losses(interrupted)
    assert resumed[STEPS] == expected[STEPS]  # bitwise: one process, fp32, the same batches
    assert resumed[MIDDLE] == expected[MIDDLE]


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process_with_the_global_batch_kept(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    beside_the_killed_run(straight, interrupted, 2)  # debug: FSDP over 2 ranks, batch 8 per rank
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
    assert resumed[MIDDLE] == expected[MIDDLE]  # logged by the 2-rank run before it was killed
    # Other ranks, other reduction order: equal to float32 rounding, not bitwise.
    assert resumed[STEPS] == pytest.approx(expected[STEPS], rel=1e-5, abs=1e-5)
