"""Averaging step and validation metrics across data-parallel ranks."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def as_scalar_tensor(name: str, value: Any, device: torch.device) -> torch.Tensor:
    """A float32 scalar on ``device`` from a 0-d (or 1-element) tensor or a number."""
    _check_metric(name, value)
    return _to_scalar(value, device)


def _to_scalar(value: Any, device: torch.device) -> torch.Tensor:
    """:func:`as_scalar_tensor` for a value :func:`_check_metric` accepted."""
    if isinstance(value, DTensor):
        # A loss under loss parallel is a replicated DTensor: the full value is already local.
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), device=device)


def _check_metric(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} has shape {tuple(value.shape)}; step results must be scalars "
                "(reduce it, e.g. .mean(), before returning it)"
            )
    elif not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} is a {type(value).__name__}; return tensors or numbers")


class StepResults:
    """The scalar results of one optimizer step's micro-batches, summed only when read.

    :meth:`add` runs on every micro-batch and only checks and keeps the values (tensors
    detached); the sums, one float32 scalar per name on the device, are built by :meth:`sums`
    at a log step. Steps that are not logged cost no tensor arithmetic.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[Any]] = {}

    def add(self, result: Mapping[str, Any]) -> None:
        for name, value in result.items():
            _check_metric(name, value)
            if isinstance(value, torch.Tensor):
                value = value.detach()
            values = self._values.get(name)
            if values is None:
                self._values[name] = [value]
            else:
                values.append(value)

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Each name's sum over the micro-batches that returned it."""
        out: dict[str, torch.Tensor] = {}
        for name, values in self._values.items():
            total = _to_scalar(values[0], device)  # checked by add()
            for value in values[1:]:
                total = total + _to_scalar(value, device)
            out[name] = total
        return out

    def clear(self) -> None:
        self._values = {}


def weighted_mean_across(
    sums: Mapping[str, torch.Tensor], weight: torch.Tensor, mesh: DeviceMesh | None
) -> dict[str, float]:
    """``sum_r sums[k] / sum_r weight`` over the ranks of ``mesh``, as Python floats.

    One collective and one host synchronization for all metrics together, plus one tiny
    all-reduce (of a hash of the sorted names) that checks every rank reduces the same names.
    Ranks that disagree all raise :class:`MetricKeysMismatchError` (naming each rank's extra
    and missing names) instead of hanging or pairing the wrong values.
    """
    names = sorted(sums)
    distributed = mesh is not None and mesh.size() > 1
    if distributed:
        assert mesh is not None
        check_same_keys(names, mesh, weight.device)
    if not names:
        return {}
    packed = torch.stack([*(sums[name] for name in names), weight.to(sums[names[0]].device)])
    if distributed:
        assert mesh is not None
        dist.all_reduce(packed, group=mesh.get_group())
    values = (packed[:-1] / packed[-1]).tolist()
    return dict(zip(names, values))


class MetricKeysMismatchError(ValueError):
    """Data-parallel ranks returned different metric names from a step (raised on every rank)."""


def _keys_hash(names: Sequence[str]) -> int:
    # Stable across processes (unlike hash()); 62 bits so that it and its negation fit int64.
    digest = hashlib.blake2b("\0".join(names).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def check_same_keys(names: Sequence[str], mesh: DeviceMesh, device: torch.device) -> None:
    """Raise :class:`MetricKeysMismatchError` on every rank of ``mesh`` unless all ranks pass
    the same sorted ``names`` (collective: every rank of ``mesh`` calls it).

    Cheap when they agree: one all-reduce (MAX) of two int64 values, the names' hash and its
    negation, so max == -max(-h) means every rank has the same hash. Only on a mismatch are
    the name lists gathered, to say which rank has which names.
    """
    group = mesh.get_group()
    digest = _keys_hash(names)
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = extremes.tolist()
    if highest == -lowest:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(names), group=group)
    union = sorted(set().union(*map(set, gathered)))
    ranks = dist.get_process_group_ranks(group)
    lines = []
    for rank, keys in zip(ranks, gathered):
        missing = [k for k in union if k not in keys]
        if missing:
            lines.append(f"  rank {rank} lacks {missing} (it has {keys})")
    raise MetricKeysMismatchError(
        "step results have different metric names on different data-parallel ranks:\n"
        + "\n".join(lines)
        + "\nreturn the same keys from training_step/validation_step on every rank (e.g. "
        "return a 0 or NaN tensor where a rank has nothing to report)"
    )


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
        # The comparison skips a dispatcher call per tensor when it is already there (CPU).
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
