"""A plan's result: every rank's memory by kind, grouped, with a verdict and the printed report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ByteSize, TypeAdapter, ValidationError

from dream_trainer.configs import DeviceParameters
from dream_trainer.launch.activations import ActivationEstimate
from dream_trainer.world import MeshLayout
from dream_trainer.world.auto_layout import format_bytes


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at its peak, by kind."""

    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    """FSDP's all-gathered parameters and unsharded gradients (estimate)."""
    activations: int
    """Activations at the peak (estimate; 0 without a ``transformer_shape``)."""
    host: int = 0
    """Kept in host memory instead (optimizer step counts; everything with ``cpu_offload``)."""
    offloaded: bool = False
    """``cpu_offload``: parameters, gradients and optimizer state live in host memory."""

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Device bytes: states (unless offloaded), gathered parameters and activations."""
        return (0 if self.offloaded else self.states) + self.gathered + self.activations


@dataclass(frozen=True)
class RankGroup:
    """Ranks of one pipeline stage that hold the same bytes."""

    ranks: tuple[int, ...]
    pp_rank: int
    memory: RankMemory
    activations: ActivationEstimate | None


@dataclass(frozen=True)
class Plan:
    """A trainer set up for a cluster on the meta device: every rank's memory and a verdict."""

    source: str
    world_size: int
    devices_per_node: int
    device_memory: int
    layout: MeshLayout
    device_parameters: DeviceParameters
    groups: tuple[RankGroup, ...]
    """Sorted by total bytes, largest first."""
    precision: str
    optimizer: str
    activations: str
    notes: tuple[str, ...]
    seconds: float

    @property
    def worst(self) -> RankGroup:
        return self.groups[0]

    @property
    def fits(self) -> bool:
        """Whether the worst rank's total fits the device memory."""
        return self.worst.memory.total <= self.device_memory

    @property
    def margin(self) -> int:
        """Device memory left on the worst rank (negative: missing)."""
        return self.device_memory - self.worst.memory.total

    def rank(self, rank: int) -> RankMemory:
        """The memory of global rank ``rank``."""
        for group in self.groups:
            if rank in group.ranks:
                return group.memory
        raise ValueError(f"rank {rank} is outside this plan's world of {self.world_size} ranks")

    def verdict(self) -> str:
        """``fits: 61.2 GiB of 80.0 GiB on rank 0, 18.8 GiB to spare`` (or does not fit)."""
        worst = self.worst
        used = f"{format_bytes(worst.memory.total)} of {format_bytes(self.device_memory)}"
        where = f"rank {worst.ranks[0]}" + (
            f" (pipeline rank {worst.pp_rank})" if self.layout.pp > 1 else ""
        )
        if self.fits:
            return f"fits: {used} on {where}, {format_bytes(self.margin)} to spare"
        return f"does not fit: {used} on {where}, {format_bytes(-self.margin)} too much"

    def describe(self) -> str:
        """The report ``dream-trainer plan`` prints."""
        nodes = self.world_size // self.devices_per_node
        layout = self.layout
        degrees = " ".join(
            f"{k}={getattr(layout, k)}" for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        )
        lines = [
            f"plan: {self.source}",
            f"world: {self.world_size} ranks = {nodes} node{'s' * (nodes != 1)} x "
            f"{self.devices_per_node} devices of {format_bytes(self.device_memory)}",
            f"layout: {degrees} (set up on meta in {self.seconds:.1f} s"
            + (", once per pipeline rank" if layout.pp > 1 else "")
            + ")",
            f"precision: {self.precision}",
            f"optimizer: {self.optimizer}",
            f"activations: {self.activations}",
            "",
            _table(self.groups),
            "",
            self.verdict(),
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _table(groups: Sequence[RankGroup]) -> str:
    header = ("ranks", "params", "grads", "optimizer", "gathered", "activations", "total")
    rows: list[tuple[str, ...]] = [header]
    for group in groups:
        m = group.memory
        values = (m.parameters, m.gradients, m.optimizer, m.gathered, m.activations, m.total)
        rows.append((describe_ranks(group.ranks), *map(format_bytes, values)))
    width = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(width[0]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(row))
        for row in rows
    ]
    if any(g.memory.offloaded or g.memory.host for g in groups):
        host = max(g.memory.host for g in groups)
        text.append(f"(host memory, not in the total: up to {format_bytes(host)} per rank)")
    return "\n".join(text)


def describe_ranks(ranks: Sequence[int]) -> str:
    """``0-3, 8-11`` for ranks 0, 1, 2, 3, 8, 9, 10, 11."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:3])
    return text + (f", ... ({len(ranks)} ranks)" if len(spans) > 3 else "")


def parse_bytes(value: int | str) -> int:
    """``"80GiB"``, ``"80GB"`` or a number of bytes."""
    try:
        parsed = int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise ValueError(
            f"device memory {value!r} is not a size; give bytes or a number with a unit, "
            "e.g. 80GiB or 141GB"
        ) from None
    if parsed <= 0:
        raise ValueError(f"device memory must be positive, got {value!r}")
    return parsed
