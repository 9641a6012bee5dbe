"""Averaging step and validation metrics across data-parallel ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def as_scalar_tensor(name: str, value: Any, device: torch.device) -> torch.Tensor:
    """A float32 scalar on ``device`` from a 0-d (or 1-element) tensor or a number."""
    if isinstance(value, DTensor):
        # A loss under loss parallel is a replicated DTensor: the full value is already local.
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} has shape {tuple(value.shape)}; step results must be scalars "
                "(reduce it, e.g. .mean(), before returning it)"
            )
        return value.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=device)
    raise TypeError(f"metric {name!r} is a {type(value).__name__}; return tensors or numbers")


def weighted_mean_across(
    sums: Mapping[str, torch.Tensor], weight: torch.Tensor, mesh: DeviceMesh | None
) -> dict[str, float]:
    """``sum_r sums[k] / sum_r weight`` over the ranks of ``mesh``, as Python floats.

    One collective and one host synchronization for all metrics together.
    """
    if not sums:
        return {}
    names = sorted(sums)
    packed = torch.stack([*(sums[name] for name in names), weight.to(sums[names[0]].device)])
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(packed, group=mesh.get_group())
    values = (packed[:-1] / packed[-1]).tolist()
    return dict(zip(names, values))


def infer_batch_size(batch: Any) -> int:
    """Length of the first dimension of the first tensor found in ``batch`` (1 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return 1
    for item in items:
        if isinstance(item, (torch.Tensor, Mapping, list, tuple)):
            return infer_batch_size(item)
    return 1


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists, tuples, namedtuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
