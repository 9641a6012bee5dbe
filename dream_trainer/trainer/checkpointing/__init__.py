"""Checkpoints on torch.distributed.checkpoint: atomic directories, safe loading, any layout."""

from dream_trainer.trainer.checkpointing.checkpointer import Checkpointer, KeyReport
from dream_trainer.trainer.checkpointing.safe_io import UnsafeCheckpointError
from dream_trainer.trainer.checkpointing.storage import CheckpointInfo, complete_checkpoints

__all__ = [
    "CheckpointInfo",
    "Checkpointer",
    "KeyReport",
    "UnsafeCheckpointError",
    "complete_checkpoints",
]
