"""The world: degree resolution, launch environments, and the mesh groups on real and fake ranks."""

from __future__ import annotations

import itertools
import logging
import math
import time

import pytest
import torch
import torch.distributed as dist

from dream_trainer.configs import DeviceParameters
from dream_trainer.world import DistributedWorld, MeshLayout, fake_world
from dream_trainer.world.environment import LaunchEnvironment, first_slurm_host
from dream_trainer.world.layout import FLATTENED_DIMS, MESH_DIMS
from tests.multirank import MultiRankError, run_on_ranks, run_with_fresh_ranks

ALL_MESHES = (*MESH_DIMS, *FLATTENED_DIMS)


def expected_group(sizes: dict[str, int], rank: int, name: str) -> list[int]:
    """Ranks sharing ``rank``'s coordinates on every dimension outside ``name`` (row-major ranks)."""
    dims = FLATTENED_DIMS.get(name, (name,))
    shape = [sizes[d] for d in MESH_DIMS]
    coords = list(itertools.product(*(range(n) for n in shape)))  # index = global rank
    mine = coords[rank]
    keep = [i for i, d in enumerate(MESH_DIMS) if d not in dims]
    return [r for r, c in enumerate(coords) if all(c[i] == mine[i] for i in keep)]


def sizes_of(layout: MeshLayout) -> dict[str, int]:
    return {dim: layout.size(dim) for dim in MESH_DIMS}


# Degree resolution (no process group needed)


def test_auto_takes_what_the_other_degrees_leave():
    layout = MeshLayout.resolve(DeviceParameters.FSDP(tensor_parallel=2), world_size=8)
    assert (layout.dp_shard, layout.tp, layout.world_size) == (4, 2, 8)
    assert MeshLayout.resolve(DeviceParameters.DDP(), world_size=3).dp_replicate == 3


def test_degrees_that_do_not_multiply_to_the_world_size_name_each_degree():
    params = DeviceParameters(dp_shard=2, tensor_parallel=2, pipeline_parallel=3)
    with pytest.raises(ValueError) as info:
        MeshLayout.resolve(params, world_size=8)
    text = str(info.value)
    for fragment in (
        "pipeline_parallel=3",
        "dp_shard=2",
        "tensor_parallel=2",
        "dp_replicate=1",
        "context_parallel=1",
        "multiply to 12",
        "world size is 8",
    ):
        assert fragment in text


def test_auto_that_cannot_divide_names_the_auto_degree():
    with pytest.raises(ValueError, match=r"dp_shard='auto'.*multiply to 3.*world size 8"):
        MeshLayout.resolve(DeviceParameters.FSDP(tensor_parallel=3), world_size=8)


@pytest.mark.parametrize(
    "degrees", [(2, 2, 2, 2, 2), (1, 4, 1, 1, 2), (2, 1, 2, 1, 1), (1, 1, 1, 1, 1)]
)
def test_layout_groups_match_independent_computation(degrees):
    layout = MeshLayout(*degrees)
    for name in ALL_MESHES:
        groups = layout.groups(name)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        for rank in range(layout.world_size):
            assert expected_group(sizes_of(layout), rank, name) in groups


def test_describe_lists_every_mesh_with_size_and_groups():
    text = MeshLayout(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2).describe()
    assert "tp                2  [0, 1] [2, 3] [4, 5] [6, 7]" in text
    assert "dp_replicate      2  [0, 4] [1, 5] [2, 6] [3, 7]" in text
    assert "dp*               4  [0, 2, 4, 6] [1, 3, 5, 7]" in text


# Launch environments


def test_plain_python_is_a_world_of_one():
    env = LaunchEnvironment.detect({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_torchrun_variables_are_read():
    env = LaunchEnvironment.detect(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "1234",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.source, env.master_addr, env.master_port) == ("torchrun", "node7", 1234)


def test_slurm_variables_are_read_when_torchrun_is_absent():
    env = LaunchEnvironment.detect(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_TASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_NODELIST": "gpu[003-004]",
            "SLURM_JOB_ID": "42",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert (env.source, env.master_addr, env.master_port) == ("slurm", "gpu003", 20042)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[003-010,012]", "gpu003"), ("a[7,9],b1", "a7"), ("x-1,x-2", "x-1")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


# Fake ranks: big layouts in one process

FAKE_LAYOUTS = {
    64: DeviceParameters(
        pipeline_parallel=2, dp_replicate=2, dp_shard=2, context_parallel=2, tensor_parallel=4
    ),
    512: DeviceParameters(
        pipeline_parallel=4, dp_replicate=2, dp_shard="auto", context_parallel=2, tensor_parallel=8
    ),
    1024: DeviceParameters(
        pipeline_parallel=8, dp_replicate=4, dp_shard=4, context_parallel=2, tensor_parallel="auto"
    ),
}


@pytest.mark.parametrize("world_size", sorted(FAKE_LAYOUTS))
def test_fake_world_builds_every_group_for_large_layouts(world_size):
    params = FAKE_LAYOUTS[world_size]
    for rank in (0, 1, world_size // 2 + 3, world_size - 1):
        with fake_world(params, world_size, rank=rank) as world:
            sizes = sizes_of(world.layout)
            assert math.prod(sizes.values()) == world_size
            assert all(size > 1 for size in sizes.values()), "every dimension must be exercised"
            for name in ALL_MESHES:
                mesh = world.get_mesh(name)
                assert mesh.mesh.flatten().tolist() == expected_group(sizes, rank, name), name
                assert mesh.size() == world.size(name)
            hsdp = world.fsdp_config["mesh"]
            assert hsdp.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
            assert sorted(hsdp.mesh.flatten().tolist()) == expected_group(sizes, rank, "dp_cp")
            assert hsdp["dp_shard_cp"].mesh.tolist() == expected_group(sizes, rank, "dp_shard_cp")
            assert world.dp_rank == expected_group(sizes, rank, "dp").index(rank)
            assert world.tp_rank == expected_group(sizes, rank, "tp").index(rank)
        assert not dist.is_initialized()


def test_fake_world_flags_follow_the_layout():
    with fake_world(DeviceParameters.FSDP(tensor_parallel=4, loss_parallel=True), 64) as world:
        assert world.tp_enabled and world.dp_shard_enabled and world.loss_parallel_enabled
        assert not (world.pp_enabled or world.cp_enabled or world.dp_replicate_enabled)
        assert world.fsdp_config["mesh"].mesh_dim_names == ("dp_shard_cp",)
    with fake_world(DeviceParameters.DDP(loss_parallel=True), 8) as world:
        assert world.dp_replicate_enabled and not world.loss_parallel_enabled


def test_unknown_mesh_name_lists_the_available_ones():
    with fake_world(DeviceParameters(), 4) as world, pytest.raises(KeyError, match="dp_shard_cp"):
        world.get_mesh("data")


def test_fsdp_config_carries_precision_and_never_pins_memory_without_accelerator():
    params = DeviceParameters.FSDP(
        cpu_offload=True,
        param_dtype="bfloat16",
        reduce_dtype="float32",
        reshard_after_forward=False,
    )
    with fake_world(params, 4) as world:
        config = world.fsdp_config
        assert config["mp_policy"].param_dtype is torch.bfloat16
        assert config["mp_policy"].reduce_dtype is torch.float32
        assert config["offload_policy"].pin_memory is False
        # Left out so the guide's fully_shard(m, **config, reshard_after_forward=False) works;
        # the trainer applies the resharding choice after apply_fully_shard.
        assert set(config) == {"mesh", "mp_policy", "offload_policy"}


def test_async_tensor_parallel_on_cpu_fails_and_says_why():
    params = DeviceParameters.FSDP(tensor_parallel=2, async_tensor_parallel=True)
    with (
        pytest.raises(ValueError, match="compile_model is False; the device is cpu"),
        fake_world(params, 4),
    ):
        pass


# Real ranks over gloo


def describe_real_groups(parameters: DeviceParameters) -> dict[str, object]:
    """On each rank: the ranks of every mesh group, read from the real process groups."""
    world = DistributedWorld(parameters).launch()
    groups = {}
    for name in ALL_MESHES:
        mesh = world.get_mesh(name)
        members: list[int] = [0] * mesh.size()
        dist.all_gather_object(members, dist.get_rank(), group=mesh.get_group())
        groups[name] = members
    result = {"groups": groups, "sizes": sizes_of(world.layout), "dp_rank": world.dp_rank}
    world.destroy()
    return result


REAL_LAYOUTS = [
    (1, DeviceParameters.SINGLE_DEVICE()),
    (2, DeviceParameters.DDP()),
    (2, DeviceParameters.FSDP()),
    (2, DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2)),
    (4, DeviceParameters.HSDP(dp_shard=2)),
    (4, DeviceParameters.FSDP(tensor_parallel=2)),
    (4, DeviceParameters(pipeline_parallel=2, context_parallel=2, dp_shard=1)),
    (8, DeviceParameters(pipeline_parallel=2, dp_replicate=1, dp_shard=2, tensor_parallel=2)),
    (8, DeviceParameters(dp_replicate=2, dp_shard=1, context_parallel=2, tensor_parallel=2)),
]


@pytest.mark.parametrize(("world_size", "params"), REAL_LAYOUTS, ids=lambda v: str(v)[:40])
def test_real_process_groups_contain_the_expected_ranks(world_size, params):
    results = run_on_ranks(describe_real_groups, world_size, params)
    for rank, result in enumerate(results):
        for name, members in result["groups"].items():
            assert members == expected_group(result["sizes"], rank, name), (rank, name)
        assert result["dp_rank"] == expected_group(result["sizes"], rank, "dp").index(rank)


def launch_mismatched_world() -> None:
    DistributedWorld(DeviceParameters(dp_shard=1, tensor_parallel=4)).launch()


def test_real_world_size_mismatch_fails_on_every_rank_with_the_fix():
    with pytest.raises(MultiRankError) as info:
        run_on_ranks(launch_mismatched_world, 2)
    text = str(info.value)
    assert "rank 0" in text and "rank 1" in text
    assert "multiply to 4" in text and "world size is 2" in text


def launch_from_torchrun_variables() -> dict[str, object]:
    assert not dist.is_initialized()
    with DistributedWorld(DeviceParameters.FSDP()) as world:
        info = {
            "source": world.environment.source,
            "backend": dist.get_backend(),
            "dp_size": world.dp_size,
            "device": str(world.device),
        }
        total = torch.tensor([1.0])
        dist.all_reduce(total)
        info["sum"] = total.item()
    info["destroyed"] = not dist.is_initialized()
    return info


def test_world_starts_and_destroys_its_own_process_group_from_torchrun_variables():
    results = run_with_fresh_ranks(launch_from_torchrun_variables, 2)
    for info in results:
        assert info == {
            "source": "torchrun",
            "backend": "gloo",
            "dp_size": 2,
            "device": "cpu",
            "sum": 2.0,
            "destroyed": True,
        }


def launch_single_process() -> dict[str, object]:
    import os

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    with DistributedWorld(DeviceParameters()) as world:
        info = {"source": world.environment.source, "world_size": world.world_size}
    info["destroyed"] = not dist.is_initialized()
    return info


def test_plain_python_needs_no_environment_variables():
    (info,) = run_with_fresh_ranks(launch_single_process, 1)
    assert info == {"source": "single", "world_size": 1, "destroyed": True}


def existing_group_is_kept() -> bool:
    with DistributedWorld(DeviceParameters.DDP()) as world:
        assert world.environment.source == "existing"
    return dist.is_initialized()


def test_an_existing_process_group_is_used_and_left_alive():
    assert run_on_ranks(existing_group_is_kept, 2) == [True, True]


def crash_inside_world() -> None:
    with DistributedWorld(DeviceParameters.DDP()) as world:
        if world.rank == 1:
            raise RuntimeError("boom on rank 1")
        time.sleep(0.5)
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: must error out, not hang


def test_an_exception_on_one_rank_leaves_no_rank_hanging():
    start = time.monotonic()
    with pytest.raises(MultiRankError) as info:
        run_with_fresh_ranks(crash_inside_world, 2, timeout=60)
    assert "boom on rank 1" in str(info.value)
    assert "did not finish" not in str(info.value), "rank 0 hung instead of failing"
    assert time.monotonic() - start < 40


def layout_log_lines() -> int:
    logger = logging.getLogger("dream_trainer.world")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # the library leaves levels to the application
    try:
        with DistributedWorld(DeviceParameters.FSDP(tensor_parallel=2)):
            pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    layout = [r.getMessage() for r in records if "world size 4" in r.getMessage()]
    if layout:
        assert "tp                2  [0, 1] [2, 3]" in layout[0]
    return len(layout)


def test_layout_is_printed_once_by_rank_zero_only():
    assert run_on_ranks(layout_log_lines, 4) == [1, 0, 0, 0]


# Teardown and the launcher watch


def test_only_torchrun_agent_variables_make_a_supervised_environment():
    ranks = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert not LaunchEnvironment.detect(ranks).supervised  # e.g. a hand-rolled launcher
    assert LaunchEnvironment.detect({**ranks, "TORCHELASTIC_RUN_ID": "job"}).supervised
    assert not LaunchEnvironment.detect({"TORCHELASTIC_RUN_ID": "job"}).supervised  # single


def test_parent_watch_reports_a_changed_parent_once(monkeypatch, caplog):
    import os
    import threading

    from dream_trainer.world import parent_watch

    died: list[int] = []
    called = threading.Event()

    def on_death(pid: int) -> None:
        died.append(pid)
        called.set()

    watch = parent_watch.ParentWatch(3, interval=0.01, on_parent_death=on_death).start()
    parent = watch.parent_pid
    assert parent == os.getppid() and watch.running
    with caplog.at_level(logging.ERROR, logger="dream_trainer.world"):
        monkeypatch.setattr(parent_watch.os, "getppid", lambda: parent + 1)
        assert called.wait(5.0)
        watch.stop()
    assert died == [parent] and watch.fired and not watch.running
    assert any(f"rank 3: the launcher process (pid {parent})" in m for m in caplog.messages)


def test_parent_watch_stops_without_firing():
    from dream_trainer.world.parent_watch import ParentWatch

    watch = ParentWatch(0, interval=0.01, on_parent_death=lambda pid: None).start()
    time.sleep(0.05)
    watch.stop()
    assert not watch.running and not watch.fired
    watch.stop()  # twice is harmless


_ORPHAN = """
import importlib.util, os, pathlib, signal, sys, time

# Load parent_watch.py by path: it needs only the standard library, and importing the package
# would import torch (seconds) in this helper.
spec = importlib.util.spec_from_file_location("parent_watch", sys.argv[3])
parent_watch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parent_watch)
out = pathlib.Path(sys.argv[2])
if sys.argv[1] == "handler":
    def on_term(signum, frame):
        (out / "cleanup-ran").touch()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
else:  # SIGTERM ignored: only the os._exit after the grace period ends this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent_watch.ParentWatch(7, interval=0.1, grace=1.0).start()
(out / "watching").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def _running(pid: int) -> bool:
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a re-parented zombie may wait a while for its reaper


@pytest.mark.parametrize("sigterm", ["handler", "ignore"])
def test_a_process_whose_parent_is_killed_ends_itself(tmp_path, sigterm):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import dream_trainer.world.parent_watch as parent_watch

    if not Path("/proc").is_dir():
        pytest.skip("reads process states from Linux /proc")
    child = tmp_path / "child.py"
    child.write_text(_ORPHAN)
    spawn = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(60)"
    args = [sys.executable, str(child), sigterm, str(tmp_path), parent_watch.__file__]
    with (tmp_path / "child.log").open("w") as log:
        middle = subprocess.Popen([sys.executable, "-c", spawn, *args], stderr=log)
    orphan = 0
    try:
        deadline = time.monotonic() + 30.0
        while not (tmp_path / "watching").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        orphan = int((tmp_path / "watching").read_text())
        middle.kill()
        middle.wait(5.0)
        killed = time.monotonic()
        while _running(orphan) and time.monotonic() - killed < 8.0:
            time.sleep(0.05)
        assert not _running(orphan), f"pid {orphan} outlived its parent by 8 s"
        assert (tmp_path / "cleanup-ran").exists() == (sigterm == "handler")
        message = f"rank 7: the launcher process (pid {middle.pid}) that started this worker"
        assert message in (tmp_path / "child.log").read_text()
    finally:
        for pid in (middle.pid, orphan):
            if pid and _running(pid):
                os.kill(pid, signal.SIGKILL)


def world_lifecycle_under_torchrun() -> dict[str, object]:
    import os

    from dream_trainer.world.process_groups import registered_groups

    calls: list[str] = []
    barrier, destroy = dist.barrier, dist.destroy_process_group

    def recording_barrier(*args, **kwargs):
        calls.append("barrier")
        return barrier(*args, **kwargs)

    def recording_destroy(group=None):
        calls.append("WORLD" if group is None else group.group_name)
        return destroy(group)

    world = DistributedWorld(DeviceParameters.FSDP()).launch()
    watch = world._parent_watch
    created = [group.group_name for group in world._created_groups]
    assert world._created_groups[0] is dist.group.WORLD
    info: dict[str, object] = {
        "watching": watch is not None and watch.running,
        "watched_parent": watch.parent_pid == os.getppid() if watch else None,
    }
    dist.barrier, dist.destroy_process_group = recording_barrier, recording_destroy
    try:
        world.destroy()
    finally:
        dist.barrier, dist.destroy_process_group = barrier, destroy
    info["watch_stopped"] = watch is None or not watch.running
    # The world started the default group first (destroyed last, by destroy_process_group()).
    info["order_ok"] = calls == ["barrier", *reversed(created[1:]), "WORLD"]
    info["created"] = len(created)
    info["left"] = (dist.is_initialized(), len(registered_groups()), world.cpu_group)
    return info


@pytest.mark.multirank
@pytest.mark.parametrize("agent", [True, False], ids=["torchrun-agent", "no-agent"])
def test_own_world_watches_its_launcher_and_destroys_every_group_newest_first(agent):
    env = {"TORCHELASTIC_RUN_ID": "test-run"} if agent else {}
    for info in run_with_fresh_ranks(world_lifecycle_under_torchrun, 2, env=env):
        assert info["watching"] is agent
        assert info["watched_parent"] is (True if agent else None)
        assert info["watch_stopped"] and info["order_ok"], info
        assert info["created"] > 1  # the size-1 mesh dimensions get groups of their own
        assert info["left"] == (False, 0, None)


def adopted_world_starts_no_watch() -> tuple[bool, bool]:
    world = DistributedWorld(DeviceParameters.DDP()).launch()
    watching = world._parent_watch is not None
    world.destroy()
    return watching, dist.is_initialized()


def test_an_adopted_process_group_gets_no_watch_and_survives_destroy():
    assert run_on_ranks(adopted_world_starts_no_watch, 2) == [(False, True), (False, True)]
