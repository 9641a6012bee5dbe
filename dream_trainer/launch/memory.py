"""Bytes a tensor takes on any rank, from its global shape and DTensor placements.

The planner sets up one rank per pipeline stage on the meta device and records each
parameter's and optimizer state's placements; :meth:`TensorRecord.local_bytes` then sizes it at
every other mesh coordinate of that stage without setting anything up again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from dream_trainer.world.layout import FLATTENED_DIMS, MESH_DIMS, MeshLayout


def _local_shape_function() -> Any:
    from torch.distributed.tensor import _utils

    compute = getattr(_utils, "_compute_local_shape_and_global_offset", None)
    if compute is None:  # pragma: no cover - depends on the torch version
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.distributed.tensor._utils."
            "_compute_local_shape_and_global_offset, which the planner uses to size DTensor "
            "shards; use torch 2.11-2.15"
        )
    return compute


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a set-up rank: global shape, element size and placements."""

    shape: tuple[int, ...]
    itemsize: int
    mesh_dims: tuple[str, ...] = ()
    """Names of the DTensor's mesh dimensions; empty for a plain tensor (same on every rank)."""
    placements: tuple[Any, ...] = ()
    padded_mesh_dim: int | None = None
    """FSDP2's shard dimension (an index into ``mesh_dims``): FSDP stores every rank's shard
    padded to the first (largest) one, so this dimension takes ``ceil(n / shards)``."""

    def local_shape(self, coordinate: dict[str, int], layout: MeshLayout) -> tuple[int, ...]:
        """The shape this tensor's storage has at ``coordinate`` (see :func:`coordinates`)."""
        if not self.mesh_dims:
            return self.shape
        mesh_shape = tuple(layout.size(name) for name in self.mesh_dims)
        return _local_shape(self, mesh_shape, tuple(coordinate[name] for name in self.mesh_dims))

    def local_bytes(self, coordinate: dict[str, int], layout: MeshLayout) -> int:
        return math.prod(self.local_shape(coordinate, layout)) * self.itemsize


@functools.lru_cache(maxsize=65536)
def _local_shape(
    record: TensorRecord, mesh_shape: tuple[int, ...], coord: tuple[int, ...]
) -> tuple[int, ...]:
    # Cached: the ranks of a large world share few distinct coordinates per tensor.
    placements = list(record.placements)
    padded = record.padded_mesh_dim
    if padded is not None:  # FSDP shards what the other placements (TP) leave locally
        placements[padded] = Replicate()
    shape, _ = _local_shape_function()(record.shape, mesh_shape, list(coord), placements)
    if padded is None:
        return tuple(shape)
    dim = record.placements[padded].dim
    padded_shape = list(shape)
    padded_shape[dim] = math.ceil(shape[dim] / mesh_shape[padded])
    return tuple(padded_shape)


def record_of(tensor: torch.Tensor, fsdp_dim: str | None = None) -> TensorRecord:
    """A record of ``tensor``; ``fsdp_dim`` names the mesh dimension FSDP2 shards it over (its
    storage is padded there) or is None for a tensor FSDP does not manage."""
    itemsize = tensor.dtype.itemsize
    if not isinstance(tensor, DTensor):
        return TensorRecord(tuple(tensor.shape), itemsize)
    names = tensor.device_mesh.mesh_dim_names
    if names is None or any(name not in _KNOWN_DIMS for name in names):
        raise ValueError(
            f"a DTensor of shape {tuple(tensor.shape)} lives on mesh dimensions {names}, which "
            f"are not the world's ({', '.join(_KNOWN_DIMS)}); the planner sizes shards on the "
            "world's meshes only (world.get_mesh(...))"
        )
    placements = tuple(tensor.placements)
    padded = None
    if fsdp_dim is not None and fsdp_dim in names:
        index = names.index(fsdp_dim)
        if _shards(placements[index]):
            padded = index
    return TensorRecord(tuple(tensor.shape), itemsize, tuple(names), placements, padded)


_KNOWN_DIMS = (*MESH_DIMS, *FLATTENED_DIMS)


def _shards(placement: Any) -> bool:
    # FSDP2 over TP uses _StridedShard, which is no Shard subclass (and not is_shard()).
    return isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard"


def coordinates(layout: MeshLayout, rank: int) -> dict[str, int]:
    """``rank``'s index along every mesh dimension and flattened mesh of ``layout``."""
    index, coordinate = rank, {}
    for name in reversed(MESH_DIMS):
        size = layout.size(name)
        coordinate[name] = index % size
        index //= size
    for name, dims in FLATTENED_DIMS.items():
        flat = 0
        for dim in dims:
            flat = flat * layout.size(dim) + coordinate[dim]
        coordinate[name] = flat
    return coordinate


def stage_ranks(layout: MeshLayout, pp_rank: int) -> range:
    """The global ranks of pipeline rank ``pp_rank`` (pp is the outermost dimension)."""
    per_stage = layout.world_size // layout.pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def count_records(records: Iterable[TensorRecord]) -> dict[TensorRecord, int]:
    """How often each distinct record occurs (a model's blocks share a few)."""
    counts: dict[TensorRecord, int] = {}
    for record in records:
        counts[record] = counts.get(record, 0) + 1
    return counts


def total_bytes(
    counts: dict[TensorRecord, int], coordinate: dict[str, int], layout: MeshLayout
) -> int:
    """Bytes of the counted records (see :func:`count_records`) at ``coordinate``."""
    return sum(n * record.local_bytes(coordinate, layout) for record, n in counts.items())


def unique_parameters(parts: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Every distinct parameter of ``parts`` (a tied weight once), with its name."""
    seen: set[int] = set()
    found = []
    for part in parts:
        for name, param in part.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                found.append((name, param))
    return found
