"""Every rank's last known position, published in the c10d store for hang reports.

Each rank's watchdog thread writes a small JSON :class:`RankRecord` (step, phase, when it entered
the phase, how many collectives it has issued on each process group, and the time of writing)
under its own key every few seconds. Store writes are point-to-point requests to the store's
server, not collectives: a rank that has stopped does not block the others' writes. Any rank can
then read every record and tell which ranks are behind (see :mod:`.hang_report`).

The watchdog uses its own clone of the default group's store (``Store.clone``, where this torch
has it), so it never waits behind a store request of the main thread.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.distributed as dist

from dream_trainer.world.progress import Position

__all__ = ["RankRecord", "RecordBoard", "collectives_issued"]

logger = logging.getLogger("dream_trainer.world")

KEY_PREFIX = "dream_trainer/rank_record/"


@dataclass
class RankRecord:
    """What one rank last published about itself; times are ``time.time()`` (wall clock)."""

    rank: int
    step: int
    phase: str
    entered: float
    """When it entered ``phase``."""
    heartbeat: float
    """When it wrote this record."""
    marks: int = 0
    collectives: dict[str, int] = field(default_factory=dict)
    """Process group name -> collectives issued on it (its sequence number)."""
    groups: dict[str, str] = field(default_factory=dict)
    """Process group name -> its description (``mesh_dp_shard``), for reading the report."""

    @classmethod
    def of(
        cls, rank: int, position: Position, groups: list[Any], now: float | None = None
    ) -> RankRecord:
        """This rank's record now, from its progress and the groups it is in."""
        wall = time.time() if now is None else now
        entered = wall - position.seconds_in_phase()
        counts, descs = collectives_issued(groups)
        return cls(
            rank, position.step, position.phase, entered, wall, position.marks, counts, descs
        )

    def seconds_in_phase(self, now: float) -> float:
        """How long it has been in its phase at ``now``, if it has not moved since writing."""
        return max(0.0, now - self.entered)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RankRecord:
        raw = json.loads(data)
        return cls(
            rank=int(raw["rank"]),
            step=int(raw["step"]),
            phase=str(raw["phase"]),
            entered=float(raw["entered"]),
            heartbeat=float(raw["heartbeat"]),
            marks=int(raw.get("marks", 0)),
            collectives={str(k): int(v) for k, v in raw.get("collectives", {}).items()},
            groups={str(k): str(v) for k, v in raw.get("groups", {}).items()},
        )


def collectives_issued(groups: list[Any]) -> tuple[dict[str, int], dict[str, str]]:
    """For each group this rank is in: collectives issued on it so far, and its description.

    Read from each group's sequence number (``_get_sequence_number_for_group``, which gloo and
    NCCL increment when a collective is issued); groups that do not have one are left out.
    """
    counts: dict[str, int] = {}
    descs: dict[str, str] = {}
    for group in groups:
        read = getattr(group, "_get_sequence_number_for_group", None)
        name = getattr(group, "group_name", None)
        if read is None or name is None:
            continue
        try:
            counts[str(name)] = int(read())
        except Exception:  # a group being torn down, a backend without sequence numbers
            continue
        desc = getattr(group, "group_desc", "")
        if desc and desc != "undefined":
            descs[str(name)] = str(desc)
    return counts, descs


class RecordBoard:
    """The ranks' records in a store: this rank writes its own key, anyone reads all keys."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def from_default_group(
        cls, rank: int, world_size: int, timeout: float = 5.0
    ) -> RecordBoard | None:
        """A board on a clone of the default process group's store; None where there is none."""
        get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
        if get_store is None or not dist.is_initialized():
            return None
        try:
            store = get_store()
        except (RuntimeError, ValueError) as error:
            logger.warning("rank %d: no c10d store for hang reports (%s)", rank, error)
            return None
        clone = getattr(store, "clone", None)
        if clone is not None:
            try:
                store = clone()
                # Only the clone's requests get the short timeout; the main thread's are untouched.
                store.set_timeout(datetime.timedelta(seconds=timeout))
            except Exception:  # a store type that cannot be cloned
                store = get_store()
        return cls(store, rank, world_size)

    @staticmethod
    def key(rank: int) -> str:
        return f"{KEY_PREFIX}{rank}"

    def publish(self, record: RankRecord) -> None:
        self.store.set(self.key(record.rank), record.to_bytes())

    def read_all(self) -> dict[int, RankRecord]:
        """Every record found, by rank; ranks that never wrote one are missing."""
        keys = [self.key(r) for r in range(self.world_size)]
        if self.store.check(keys) and hasattr(self.store, "multi_get"):
            values = dict(zip(range(self.world_size), self.store.multi_get(keys)))
        else:
            values = {r: self.store.get(k) for r, k in enumerate(keys) if self.store.check([k])}
        records = {}
        for rank, data in values.items():
            try:
                records[rank] = RankRecord.from_bytes(bytes(data))
            except (ValueError, KeyError, TypeError):
                continue
        return records

    def clear(self) -> None:
        """Remove this rank's record (a later run on the same store starts without it)."""
        self.store.delete_key(self.key(self.rank))
