"""Resolved parallel degrees and the rank groups they imply (no process group needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dream_trainer.configs import DeviceParameters

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Mesh dimensions, outermost first. TP is innermost so its groups are neighbouring ranks."""

FLATTENED_DIMS: dict[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}
"""Meshes made by merging neighbouring dimensions: data sharding, the FSDP mesh, loss reduction."""

_FIELD_OF_DIM = {
    "pp": "pipeline_parallel",
    "dp_replicate": "dp_replicate",
    "dp_shard": "dp_shard",
    "cp": "context_parallel",
    "tp": "tensor_parallel",
}


@dataclass(frozen=True)
class MeshLayout:
    """The five degrees with ``"auto"`` resolved against a world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def resolve(
        cls, parameters: DeviceParameters, world_size: int, ranks_per_node: int | None = None
    ) -> MeshLayout:
        """Resolve ``"node"`` and ``"auto"``; check that the degrees multiply to ``world_size``.

        ``ranks_per_node`` (the launcher's local world size) is needed for ``dp_shard="node"``.
        """
        if world_size < 1:
            raise ValueError(f"world size must be at least 1, got {world_size}")
        if parameters.auto_layout is not None:
            raise ValueError(
                "these device parameters are an automatic layout (auto_layout is set): the world "
                "chooses their degrees when it launches. To resolve them yourself, pass "
                "dream_trainer.world.choose_layout(...).device_parameters instead"
            )
        requested = {dim: getattr(parameters, field) for dim, field in _FIELD_OF_DIM.items()}
        if requested["dp_shard"] == "node":
            requested["dp_shard"] = _ranks_per_node_shard(requested, ranks_per_node or 1)
        fixed = math.prod(v for v in requested.values() if v != "auto")
        auto = [dim for dim, v in requested.items() if v == "auto"]
        described = ", ".join(f"{_FIELD_OF_DIM[d]}={v}" for d, v in requested.items())
        if auto:
            if world_size % fixed:
                raise ValueError(
                    f"cannot resolve {_FIELD_OF_DIM[auto[0]]}='auto': the other degrees "
                    f"({described}) multiply to {fixed}, which does not divide the world size "
                    f"{world_size}. Change the degrees or launch a multiple of {fixed} ranks."
                )
            requested[auto[0]] = world_size // fixed
        elif fixed != world_size:
            raise ValueError(
                f"the parallel degrees multiply to {fixed} ({described}) but the world size is "
                f"{world_size}. Make their product equal the number of ranks launched, or set "
                "one degree to 'auto'."
            )
        return cls(**{dim: int(v) for dim, v in requested.items()})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.size(dim) for dim in MESH_DIMS)

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    def size(self, name: str) -> int:
        """Size of a mesh dimension or flattened mesh."""
        if name in FLATTENED_DIMS:
            return math.prod(getattr(self, dim) for dim in FLATTENED_DIMS[name])
        if name not in MESH_DIMS:
            raise KeyError(_unknown_mesh_message(name))
        return int(getattr(self, name))

    def rank_grid(self) -> torch.Tensor:
        """Global ranks laid out in mesh order, shape ``self.shape``."""
        return torch.arange(self.world_size).reshape(self.shape)

    def groups(self, name: str) -> list[list[int]]:
        """Every group of ranks that communicate along ``name``, sorted by first rank."""
        dims = FLATTENED_DIMS.get(name, (name,))
        if any(dim not in MESH_DIMS for dim in dims):
            raise KeyError(_unknown_mesh_message(name))
        axes = [MESH_DIMS.index(dim) for dim in dims]
        others = [i for i in range(len(MESH_DIMS)) if i not in axes]
        grid = self.rank_grid().permute(*others, *axes).reshape(-1, self.size(name))
        return sorted(row.tolist() for row in grid)

    def coordinate(self, rank: int) -> dict[str, int]:
        """Index of ``rank`` along each dimension."""
        coords = (self.rank_grid() == rank).nonzero()
        if coords.shape[0] != 1:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size} ranks")
        return dict(zip(MESH_DIMS, coords[0].tolist()))

    def describe(self, max_groups: int = 4) -> str:
        """A table of every dimension: its size and the rank groups sharing it."""
        lines = [f"{'mesh':<14}{'size':>5}  groups"]
        for name in (*MESH_DIMS, *FLATTENED_DIMS):
            groups = self.groups(name)
            shown = " ".join(_short(g) for g in groups[:max_groups])
            if len(groups) > max_groups:
                shown += f" ... ({len(groups)} groups)"
            label = name if name in MESH_DIMS else f"{name}*"
            lines.append(f"{label:<14}{self.size(name):>5}  {shown}")
        lines.append(
            "(* flattened: "
            + "; ".join(f"{k} = {' x '.join(v)}" for k, v in FLATTENED_DIMS.items())
            + ")"
        )
        return "\n".join(lines)


def _ranks_per_node_shard(requested: dict[str, int | str], ranks_per_node: int) -> int:
    inner = [d for d in ("cp", "tp") if isinstance(requested[d], int)]
    width = math.prod(int(requested[d]) for d in inner)
    if any(requested[d] == "auto" for d in ("cp", "tp")) or ranks_per_node % width:
        names = " x ".join(f"{_FIELD_OF_DIM[d]}={requested[d]}" for d in ("cp", "tp"))
        raise ValueError(
            f"dp_shard='node' shards over the {ranks_per_node} ranks of a node divided by "
            f"{names}, which must be numbers dividing {ranks_per_node}. Give dp_shard a number, "
            "or launch a multiple of context_parallel x tensor_parallel ranks per node."
        )
    return ranks_per_node // width


def _short(group: list[int], limit: int = 8) -> str:
    """``[0, 1, 2, ..., 127]`` instead of all 128 ranks."""
    if len(group) <= limit:
        return str(group)
    head = ", ".join(str(r) for r in group[: limit - 2])
    return f"[{head}, ..., {group[-1]}]"


def _unknown_mesh_message(name: str) -> str:
    names = ", ".join((*MESH_DIMS, *FLATTENED_DIMS))
    return f"no mesh named {name!r}; available meshes: {names}"
