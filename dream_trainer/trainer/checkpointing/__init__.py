"""Checkpoints on torch.distributed.checkpoint: atomic directories, safe loading, any layout,
and export to safetensors."""

from dream_trainer.trainer.checkpointing.checkpointer import Checkpointer, KeyReport
from dream_trainer.trainer.checkpointing.export import (
    checkpoint_tensors,
    export_safetensors,
    load_safetensors,
    safetensors_files,
)
from dream_trainer.trainer.checkpointing.safe_io import UnsafeCheckpointError
from dream_trainer.trainer.checkpointing.storage import CheckpointInfo, complete_checkpoints

__all__ = [
    "CheckpointInfo",
    "Checkpointer",
    "KeyReport",
    "UnsafeCheckpointError",
    "checkpoint_tensors",
    "complete_checkpoints",
    "export_safetensors",
    "load_safetensors",
    "safetensors_files",
]
