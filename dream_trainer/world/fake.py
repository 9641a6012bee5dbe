"""A world of any size in one process, on torch's fake process group, for checking layouts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from dream_trainer.configs import DeviceParameters
from dream_trainer.world.distributed_world import DistributedWorld
from dream_trainer.world.environment import LaunchEnvironment


@contextmanager
def fake_world(
    device_parameters: DeviceParameters, world_size: int, rank: int = 0, ranks_per_node: int = 1
) -> Iterator[DistributedWorld]:
    """Launch ``device_parameters`` as rank ``rank`` of a fake ``world_size``-rank world with
    ``ranks_per_node`` ranks on each node (``dp_shard="node"`` and the automatic layout read it).

    Collectives return immediately without moving data, so this checks meshes and placements,
    not numerics. Nothing else may hold a process group in this process meanwhile.
    """
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as error:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            "this torch build has no fake process group (torch.testing._internal.distributed.fake_pg)"
        ) from error
    if dist.is_initialized():
        raise RuntimeError(
            "a process group already exists in this process; fake_world needs to start its own"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    environment = LaunchEnvironment(
        rank=rank,
        world_size=world_size,
        local_rank=0,
        local_world_size=ranks_per_node,
        source="existing",
    )
    world = DistributedWorld(device_parameters, device="cpu", environment=environment)
    try:
        yield world.launch()
    finally:
        world.destroy()
        dist.destroy_process_group()
