"""Specification of the multi-rank CPU test harness in ``tests/multirank.py``."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests import multirank
from tests.multirank import MultiRankError, run_on_ranks, run_torchrun, run_with_fresh_ranks

pytestmark = pytest.mark.multirank

# Functions run on the ranks must be module-level so they pickle by qualified name.


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _add(a: int, *, b: int) -> int:
    import torch.distributed as dist

    return a + b + dist.get_rank()


def _all_reduce_rank_plus_one() -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank1(message: str) -> int:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError(message)
    return dist.get_rank()


def _sleep_on_rank0(seconds: float) -> int:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        time.sleep(seconds)
    return dist.get_rank()


def _fail_on_rank1_then_reduce(crash: bool) -> None:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        if crash:
            os._exit(7)
        raise ValueError("rank 1 gives up")
    dist.all_reduce(torch.ones(1))


def _pid() -> int:
    return os.getpid()


def _env() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    return {
        **{name: os.environ.get(name) for name in names},
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
        "pg": dist.is_initialized(),
        "flag": os.environ.get("DREAM_TEST_FLAG"),
    }


def _leak_global_state() -> None:
    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    os.environ["DREAM_TEST_LEAK"] = "1"


def _global_state() -> tuple[Any, bool, str | None]:
    import torch

    return torch.get_default_dtype(), torch.is_grad_enabled(), os.environ.get("DREAM_TEST_LEAK")


def _destroy_default_group() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()


def _reduce_in_subgroup() -> float:
    import torch
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    t = torch.ones(1)
    if dist.get_rank() in (0, 1):
        dist.all_reduce(t, group=group)
    return t.item()


def _group_count() -> int:
    from torch.distributed import distributed_c10d

    return len(distributed_c10d._world.pg_map)


def _env_then_own_group() -> tuple[dict[str, Any], float]:
    import torch
    import torch.distributed as dist

    env = _env()
    dist.init_process_group("gloo")  # env:// from the torchrun-like variables
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return env, t.item()


# ------------------------------------------------------------------------ run_on_ranks


def test_results_come_back_in_rank_order() -> None:
    assert run_on_ranks(_rank_and_world, 4) == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_args_and_kwargs_reach_every_rank() -> None:
    assert run_on_ranks(_add, 2, 10, b=5) == [15, 16]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sums_over_the_pool(world_size: int) -> None:
    expected = float(sum(range(1, world_size + 1)))
    assert run_on_ranks(_all_reduce_rank_plus_one, world_size) == [expected] * world_size


def test_pool_is_reused_across_calls() -> None:
    first = run_on_ranks(_pid, 2)
    assert run_on_ranks(_pid, 2) == first
    assert len(set(first)) == 2 and os.getpid() not in first


def test_ranks_look_like_torchrun_workers() -> None:
    envs = run_on_ranks(_env, 2)
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
        assert env["OMP_NUM_THREADS"] == "1" and env["threads"] == 1
        assert env["pg"] is True


def test_global_state_is_reset_between_calls() -> None:
    import torch

    run_on_ranks(_leak_global_state, 2)
    assert run_on_ranks(_global_state, 2) == [(torch.float32, True, None)] * 2


def test_destroyed_default_group_is_recreated() -> None:
    run_on_ranks(_destroy_default_group, 2)
    assert run_on_ranks(_all_reduce_rank_plus_one, 2) == [3.0, 3.0]


def test_subgroups_created_by_a_call_are_destroyed_after_it() -> None:
    assert run_on_ranks(_reduce_in_subgroup, 4) == [2.0, 2.0, 1.0, 1.0]
    assert run_on_ranks(_group_count, 4) == [1] * 4


def test_failing_rank_is_reported_with_traceback() -> None:
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(_raise_on_rank1, 2, "boom-42")
    text = str(info.value)
    assert list(info.value.failures) == [1]
    assert "rank 1" in text and "ValueError: boom-42" in text
    assert "raise ValueError(message)" in text and "_raise_on_rank1" in text
    assert run_on_ranks(_rank_and_world, 2) == [(0, 2), (1, 2)]


def test_hung_rank_times_out_with_its_stack_and_pool_is_rebuilt() -> None:
    pids = run_on_ranks(_pid, 2)
    start = time.monotonic()
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(_sleep_on_rank0, 2, 60.0, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 8.0
    text = str(info.value)
    assert list(info.value.failures) == [0]
    assert "rank 0" in text and "timed out" in text
    assert "in _sleep_on_rank0" in text  # faulthandler frame of the stuck rank
    new_pids = run_on_ranks(_pid, 2)
    assert set(new_pids).isdisjoint(pids)


def test_crashed_rank_is_reported_with_its_exit_code() -> None:
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(_fail_on_rank1_then_reduce, 2, True, timeout=60.0)
    assert "exited with code 7" in info.value.failures[1]
    assert 0 in info.value.failures  # its all_reduce lost the peer (gloo error or grace period)


def test_rank_waiting_for_a_failed_peer_is_killed_after_a_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multirank, "FAILURE_GRACE_S", 1.0)
    run_on_ranks(_pid, 2)  # start the pool outside the timed part
    start = time.monotonic()
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(_fail_on_rank1_then_reduce, 2, False, timeout=60.0)
    assert time.monotonic() - start < 15.0  # the grace period, not the 60 s timeout
    assert "ValueError: rank 1 gives up" in info.value.failures[1]
    assert "still running 1 s after rank(s) [1] failed" in info.value.failures[0]
    assert "in all_reduce" in info.value.failures[0]  # its stack shows where it waited


def test_local_functions_are_rejected_before_anything_runs() -> None:
    with pytest.raises(TypeError, match="module-level"):
        run_on_ranks(lambda: 0, 2)


# ---------------------------------------------------------------- run_with_fresh_ranks


def test_fresh_ranks_have_torchrun_env_and_start_their_own_group() -> None:
    results = run_with_fresh_ranks(_env_then_own_group, 2, env={"DREAM_TEST_FLAG": "on"})
    envs = [env for env, _ in results]
    assert [(env["RANK"], env["WORLD_SIZE"], env["pg"]) for env in envs] == [
        ("0", "2", False),
        ("1", "2", False),
    ]
    assert all(env["flag"] == "on" and env["OMP_NUM_THREADS"] == "1" for env in envs)
    assert [total for _, total in results] == [2.0, 2.0]  # env:// init used MASTER_ADDR/PORT


def test_fresh_rank_failure_is_reported() -> None:
    with pytest.raises(MultiRankError, match=r"(?s)rank 1.*ValueError: fresh-boom"):
        run_with_fresh_ranks(_raise_on_rank1_fresh, 2)


def _raise_on_rank1_fresh() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("fresh-boom")


# ------------------------------------------------------------------------ run_torchrun

_GOOD_SCRIPT = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} sum {t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_torchrun_runs_a_script_on_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "good.py"
    script.write_text(textwrap.dedent(_GOOD_SCRIPT))
    done = run_torchrun([str(script)], nproc=2, timeout=120.0)
    assert done.returncode == 0
    assert "rank 0 sum 3" in done.stdout and "rank 1 sum 3" in done.stdout


def test_torchrun_failure_raises_with_stderr_tail(tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("raise RuntimeError('torchrun-failure-marker')\n")
    with pytest.raises(AssertionError, match=r"(?s)exited with code.*torchrun-failure-marker"):
        run_torchrun([str(script)], nproc=2, timeout=120.0)


def test_torchrun_timeout_kills_every_worker(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, f'pid{{os.getpid()}}').touch()\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(AssertionError, match="timed out after 6 s"):
        run_torchrun([str(script)], nproc=2, timeout=6.0)
    for pid_file in tmp_path.glob("pid*"):  # workers that started must be gone (or zombies)
        stat = Path(f"/proc/{pid_file.name[3:]}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"
