"""The distributed world: launch environment, process group, device and DeviceMesh."""

from dream_trainer.world.auto_layout import LayoutChoice, ModelSize, choose_layout
from dream_trainer.world.distributed_world import DistributedWorld
from dream_trainer.world.fake import fake_world
from dream_trainer.world.layout import MeshLayout

__all__ = [
    "DistributedWorld",
    "LayoutChoice",
    "MeshLayout",
    "ModelSize",
    "choose_layout",
    "fake_world",
]
