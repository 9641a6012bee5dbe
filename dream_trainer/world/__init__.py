"""The distributed world: launch environment, process group, device and DeviceMesh."""

from dream_trainer.world.distributed_world import DistributedWorld, backend_for, pick_device
from dream_trainer.world.environment import LaunchEnvironment, first_slurm_host
from dream_trainer.world.fake import fake_world
from dream_trainer.world.layout import FLATTENED_DIMS, MESH_DIMS, MeshLayout

__all__ = [
    "FLATTENED_DIMS",
    "MESH_DIMS",
    "DistributedWorld",
    "LaunchEnvironment",
    "MeshLayout",
    "backend_for",
    "fake_world",
    "first_slurm_host",
    "pick_device",
]
