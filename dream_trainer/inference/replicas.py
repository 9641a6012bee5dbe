"""Which ranks act as one model replica, and which of them speaks for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dream_trainer.world import DistributedWorld


@dataclass(frozen=True)
class Replicas:
    """The data-parallel replicas of a world, seen from one rank.

    A replica is every rank with one data-parallel index: one rank under DDP/FSDP, a TP group,
    a CP group, a PP pipeline, or their product. All ranks of a replica get the same items and
    compute together; the replica's lowest rank (its *leader*) hands in the results.
    """

    count: int
    """Number of replicas (the data-parallel size)."""
    index: int
    """This rank's replica."""
    rank: int
    """This rank (global)."""
    ranks: tuple[tuple[int, ...], ...]
    """The global ranks of each replica, lowest first."""
    group: Any = None
    """The CPU-capable process group the results travel on (``None``: one process)."""
    lockstep: bool = False
    """The model's forward talks across replicas (FSDP all-gathers over ``dp_shard``), so every
    rank must make the same calls: every batch is filled up to the batch size with a padding item,
    and a rank out of items runs padding batches (their results are dropped)."""

    @property
    def is_leader(self) -> bool:
        return self.rank == self.ranks[self.index][0]

    @property
    def independent(self) -> bool:
        """Each replica is one rank and runs no collective with the others in its forward, so a
        failed batch can be reported after the exchange and rerun elsewhere."""
        return not self.lockstep and all(len(r) == 1 for r in self.ranks)

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.ranks)

    def describe(self, replica: int) -> str:
        ranks = self.ranks[replica]
        return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"

    @classmethod
    def of_world(cls, world: DistributedWorld) -> Replicas:
        """Replicas of a launched :class:`DistributedWorld` (the ``dp`` mesh dimension)."""
        grid = world.layout.rank_grid()  # (pp, dp_replicate, dp_shard, cp, tp)
        by_replica = grid.permute(1, 2, 0, 3, 4).reshape(world.dp_size, -1)
        ranks = tuple(tuple(sorted(row.tolist())) for row in by_replica)
        group = world.cpu_group if world.world_size > 1 else None
        return cls(
            count=world.dp_size,
            index=world.dp_rank,
            rank=world.rank,
            ranks=ranks,
            group=group,
            # FSDP all-gathers across replicas; a pipeline schedule needs full, fixed batches.
            lockstep=world.dp_shard_size > 1 or world.pp_enabled,
        )

    @classmethod
    def of_process_group(cls, lockstep: bool = False) -> Replicas:
        """Every rank of the default process group is a replica (one process if there is none)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls(count=1, index=0, rank=0, ranks=((0,),))
        size, rank = dist.get_world_size(), dist.get_rank()
        return cls(
            count=size,
            index=rank,
            rank=rank,
            ranks=tuple((r,) for r in range(size)),
            group=dist.group.WORLD,
            lockstep=lockstep,
        )
