"""Split every sequence-shaped tensor of a batch over the context-parallel ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dream_trainer.parallel.context.layout import ContextLayout

__all__ = ["sequence_length", "shard_batch"]


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in _tensors(value)]
    if isinstance(batch, (list, tuple)):
        return [t for value in batch for t in _tensors(value)]
    return []


def sequence_length(batch: Any, dim: int = 1) -> int | None:
    """Length along ``dim`` of the first tensor in ``batch`` that has that dimension."""
    for tensor in _tensors(batch):
        if tensor.dim() > dim:
            return int(tensor.shape[dim])
    return None


def shard_batch(batch: Any, layout: ContextLayout, dim: int = 1, multiple: int = 1) -> Any:
    """``batch`` with every tensor whose ``dim`` has the sequence length cut to this rank's share.

    The sequence length is that of the first tensor with a ``dim`` dimension (token ids,
    labels, positions, document ids all share it); other tensors pass unchanged. The length
    must be a multiple of the number of chunks times ``multiple`` (the tensor-parallel degree,
    whose sequence-parallel regions split the local share again).
    """
    length = sequence_length(batch, dim)
    if length is None:
        raise ValueError(
            "context parallelism splits the batch along dimension "
            f"{dim} (the sequence), but the batch has no tensor with that dimension; "
            "return (batch, sequence, ...) tensors from the dataloader"
        )
    layout.check_length(length, multiple)
    return _shard(batch, layout, dim, length)


def _shard(batch: Any, layout: ContextLayout, dim: int, length: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() > dim and batch.shape[dim] == length:
            return layout.shard(batch, dim)
        return batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _shard(v, layout, dim, length) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_shard(v, layout, dim, length) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_shard(v, layout, dim, length) for v in batch)
    return batch
