"""Layouts that fit: candidate degrees for a world, each planned on meta, least communication first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dream_trainer.configs import DeviceParameters
from dream_trainer.launch.plan_report import Plan, parse_bytes
from dream_trainer.launch.planner import TrainerSource, load_trainer, plan_loaded, ranks_per_node
from dream_trainer.world import MeshLayout
from dream_trainer.world.auto_layout import format_bytes

_DATA_PARALLEL_ORDER = {"DDP": 0, "HSDP": 1, "FSDP": 2}


@dataclass(frozen=True)
class Suggestion:
    """One candidate layout and what planning it gave."""

    layout: MeshLayout
    kind: str
    """``"FSDP"``, ``"HSDP x TP 2"``, ``"DDP x PP 4"``, ..."""
    plan: Plan | None = None
    refused: str | None = None
    """The error the set-up raised for this layout (as a launch would)."""
    skipped: str | None = None
    """Why it was not set up: its parameters, gradients and optimizer state alone exceed the
    device memory."""

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    def describe(self) -> str:
        degrees = describe_degrees(self.layout)
        if self.plan is not None:
            return f"{degrees:<44} {self.kind:<22} {self.plan.verdict()}"
        return f"{degrees:<44} {self.kind:<22} {self.refused or self.skipped}"


def describe_degrees(layout: MeshLayout) -> str:
    names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    return (
        " ".join(f"{n}={getattr(layout, n)}" for n in names if getattr(layout, n) > 1) or "one rank"
    )


def _kind(layout: MeshLayout, data_parallel: str) -> str:
    parts = [data_parallel] if data_parallel else []
    parts += [
        f"{n.upper()} {getattr(layout, n)}" for n in ("tp", "cp", "pp") if getattr(layout, n) > 1
    ]
    return " x ".join(parts) or "one rank"


def candidate_layouts(world_size: int, devices_per_node: int) -> list[tuple[MeshLayout, str]]:
    """Every layout of ``world_size`` ranks with tensor parallelism a divisor of
    ``devices_per_node`` up to 8, context parallelism 1-8, pipeline parallelism up to 16 and
    DDP, HSDP (sharded within a node) or FSDP over the rest; least communication first.

    Order: fewest ranks per model replica split by TP x CP x PP, then lower TP, CP and PP, then
    DDP before HSDP before FSDP (all-reduce only; then sharding within a node; then across).
    """
    found: list[tuple[tuple[int, ...], MeshLayout, str]] = []
    tps = [t for t in range(1, min(8, devices_per_node) + 1) if devices_per_node % t == 0]
    for tp in tps:
        for cp in (1, 2, 4, 8):
            for pp in range(1, 17):
                inner = tp * cp * pp
                if world_size % inner:
                    continue
                dp = world_size // inner
                options = {"FSDP": (1, dp)}
                if dp > 1:
                    options["DDP"] = (dp, 1)
                node = devices_per_node // (tp * cp) if devices_per_node % (tp * cp) == 0 else 0
                if 1 < node < dp and dp % node == 0:
                    options["HSDP"] = (dp // node, node)
                for kind, (replicate, shard) in options.items():
                    layout = MeshLayout(pp=pp, dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp)
                    key = (inner, tp, cp, pp, _DATA_PARALLEL_ORDER[kind])
                    found.append((key, layout, _kind(layout, kind if dp > 1 else "")))
    found.sort(key=lambda item: item[0])
    return [(layout, kind) for _, layout, kind in found]


def with_degrees(params: DeviceParameters, layout: MeshLayout) -> DeviceParameters:
    """``params`` with the five degrees of ``layout`` (and no automatic layout)."""
    return params.model_copy(
        update={
            "pipeline_parallel": layout.pp,
            "dp_replicate": layout.dp_replicate,
            "dp_shard": layout.dp_shard,
            "context_parallel": layout.cp,
            "tensor_parallel": layout.tp,
            "auto_layout": None,
        }
    )


def replica_state_bytes(plan: Plan) -> int:
    """Parameters, gradients and optimizer state of one model replica, summed over its ranks."""
    total = sum(len(g.ranks) * g.memory.states for g in plan.groups)
    return total // plan.layout.dp_replicate


def suggest_layouts(
    trainer: TrainerSource,
    *,
    world_size: int,
    devices_per_node: int = 8,
    device_memory: int | str = "80GiB",
    script_args: Sequence[str] = (),
    limit: int = 3,
) -> list[Suggestion]:
    """Plan candidate layouts (see :func:`candidate_layouts`) in order until ``limit`` fit.

    Returns every candidate tried, in that order: the ones that fit, the ones that do not,
    the ones the set-up refused (with its error) and the ones skipped because their states
    alone (one replica's, measured by the first plan, divided over its shards) exceed memory.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    memory = parse_bytes(device_memory)
    loaded = load_trainer(trainer, script_args)
    base = loaded.config.device_parameters
    per_node = ranks_per_node(world_size, devices_per_node)
    replica: int | None = None
    tried: list[Suggestion] = []
    for layout, kind in candidate_layouts(world_size, per_node):
        if replica is not None:
            # FSDP shards over dp_shard x cp (also under "DDP" with cp > 1: then it is HSDP).
            shards = layout.tp * layout.pp * layout.size("dp_shard_cp")
            floor = math.floor(0.95 * replica / shards)  # FSDP padding makes the measure a bit high
            if floor > memory:
                tried.append(
                    Suggestion(
                        layout, kind, skipped=f"states alone need about {format_bytes(floor)}"
                    )
                )
                continue
        try:
            plan = plan_loaded(
                loaded, world_size, per_node, memory, with_degrees(base, layout), kind
            )
        except Exception as error:
            tried.append(Suggestion(layout, kind, refused=f"refused: {error}"))
            continue
        if replica is None:
            replica = replica_state_bytes(plan)
        tried.append(Suggestion(layout, kind, plan=plan))
        if sum(s.fits for s in tried) >= limit:
            break
    return tried
