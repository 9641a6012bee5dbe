"""Runs end cleanly: no abort after a clean ``fit()``, and no worker outlives a killed launcher.

Both tests start real ``torchrun`` jobs (2 CPU ranks, gloo). ``benchmarks/clean_exit.py`` is the
reproducer of the exit abort (run it with ``--runs N`` to count exits); here its ``--worker``
mode is the training job whose launcher gets killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.multirank import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multirank

# A gloo worker frees a collective's tensors after signalling its completion, and needs the GIL
# for that when Python has dropped them already. Here rank 0 enters teardown while its all-reduce
# still waits for rank 1, with neither the tensor nor the work kept. A long switch interval stops
# the worker from taking the GIL before the interpreter finalizes, and the object freed during
# finalization sleeps (GIL released): a worker still releasing then wakes into a finalizing
# interpreter, is ended by pthread_exit inside a noexcept destructor, and the process aborts with
# "terminate called without an active exception". Run with ``plain`` instead of ``world`` (plain
# ``dist.destroy_process_group()``, which is all ``world.destroy()`` used to do) it aborted 4 runs
# of 4; ``world.destroy()`` waits at a barrier and lets the workers finish first.
_LATE_COLLECTIVE = """
import sys
import time

import torch
import torch.distributed as dist

from dream_trainer.configs import DeviceParameters
from dream_trainer.world import DistributedWorld


class SlowToFree:
    def __del__(self):
        time.sleep(1.0)


_freed_while_finalizing = SlowToFree()
world = DistributedWorld(DeviceParameters.DDP()).launch()
rank = dist.get_rank()
if rank == 1:
    time.sleep(1.0)
dist.all_reduce(torch.ones(4), async_op=True)
print(f"rank {rank} tears down", flush=True)
sys.setswitchinterval(30.0)
world.destroy() if sys.argv[1] == "world" else dist.destroy_process_group()
"""


def test_a_collective_finishing_during_teardown_does_not_abort_the_exit(tmp_path: Path) -> None:
    script = tmp_path / "late_collective.py"
    script.write_text(textwrap.dedent(_LATE_COLLECTIVE))
    done = run_torchrun([str(script), "world"], nproc=2, timeout=120.0)
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    assert "rank 0 tears down" in done.stdout and "rank 1 tears down" in done.stdout


def _alive(pid: int) -> bool:
    """Running and not a zombie (a re-parented worker's zombie may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker states from Linux /proc")
def test_killing_the_launcher_ends_its_workers(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # 600 steps of >= 0.1 s: a minute of training unless the workers notice the launcher died.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO_ROOT / "benchmarks" / "clean_exit.py"), "--worker", "--steps", "600"]
    cmd += ["--step-sleep", "0.1", "--marker-dir", str(markers), "--run-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    log = (tmp_path / "torchrun.log").open("w")
    agent = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    workers: list[int] = []
    try:
        started = _wait_for(lambda: len(list(markers.glob("started-*"))) == 2, timeout=90.0)
        log_text = (tmp_path / "torchrun.log").read_text()
        assert started, f"the workers did not start training:\n{log_text[-3000:]}"
        workers = [int(p.name.rsplit("-", 1)[1]) for p in markers.glob("started-*")]
        assert all(map(_alive, workers))

        agent.kill()  # SIGKILL: torchrun gets no chance to stop its workers
        agent.wait(10.0)
        killed_at = time.monotonic()
        gone = _wait_for(lambda: not any(map(_alive, workers)), timeout=10.0)
        took = time.monotonic() - killed_at
        log_text = (tmp_path / "torchrun.log").read_text()
        assert gone, f"workers {[p for p in workers if _alive(p)]} still run 10 s after the kill"
        assert took < 10.0
        # The first worker to notice says why it stops; its peer may then fail in a collective
        # (connection reset) before its own watch fires, which ends it just as well.
        assert f"the launcher process (pid {agent.pid}) that started this worker" in log_text
    finally:
        for pid in [agent.pid, *workers]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(5.0)
        log.close()
