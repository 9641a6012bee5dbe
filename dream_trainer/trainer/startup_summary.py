"""The start-up summary rank 0 logs once set-up is done: models' sizes and the training data.

For each model: its parameter count (total and trainable, the whole model's: a DTensor counts
its global size, a tied weight once, and under pipeline parallelism every stage's parameters
are added up) and the elements of the shard each rank holds (a DTensor's local shape, a plain
tensor's whole shape). For the training loader: its batch size per rank, its length, the samples
per optimizer step and the steps per epoch the loop will run; and where each parameter lies on
the mesh (rank 0's view). Gathered with one all-gather over the CPU group.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from dream_trainer.trainer.base import BaseTrainer

logger = logging.getLogger("dream_trainer.metrics")


@dataclass(frozen=True)
class ModelSummary:
    parameters: int
    """Elements of every distinct parameter of the whole model."""
    trainable: int
    """Of those, the ones with ``requires_grad``."""
    local_elements: list[int]
    """Parameter elements stored on each rank (index = global rank)."""
    local_bytes: list[int]
    """The same in bytes."""


@dataclass(frozen=True)
class StartupSummary:
    models: dict[str, ModelSummary]
    batch_size: int | None
    """Samples per micro-batch on each rank (the loader's ``batch_size``); None if unknown."""
    batches_per_rank: list[int | None]
    """``len(train loader)`` on each rank; None where the loader has no length."""
    dp_size: int
    accumulation: int
    steps_per_epoch: int | None
    """Optimizer steps per epoch (None: the loader has no length and no limit is set)."""
    placements: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Per model, ``(parameter names, placement)`` on this rank: which mesh dims shard or
    replicate each parameter; layer indices are shown as ``*`` (layers that differ list each
    placement, joined by ``|``)."""
    serving: bool = False
    """Set up for inference (``serving()``): no training data to describe."""

    @property
    def samples_per_step(self) -> int | None:
        if self.batch_size is None:
            return None
        return self.batch_size * self.dp_size * self.accumulation

    def describe(self) -> str:
        """The summary as rank 0 logs it."""
        lines = ["start-up summary"]
        if self.models:
            width = max(5, *(len(name) for name in self.models))
            lines.append(
                f"{'model':<{width}}  {'parameters':>12}  {'trainable':>12}  "
                "local shard per rank (elements)"
            )
            for name, model in self.models.items():
                lines.append(
                    f"{name:<{width}}  {model.parameters:>12,}  {model.trainable:>12,}  "
                    + _per_rank(model.local_elements)
                )
        for name, rows in self.placements.items():
            lines.append(f"placement of {name} (rank 0):")
            width = max(len(names) for names, _ in rows) if rows else 0
            shown = rows if len(rows) <= _MAX_PLACEMENT_ROWS else rows[:_MAX_PLACEMENT_ROWS]
            lines += [f"  {names:<{width}}  {where}" for names, where in shown]
            if len(rows) > len(shown):
                lines.append(f"  ... {len(rows) - len(shown)} more")
        lines.append(
            "set up for inference: no training data, optimizers or metric sinks"
            if self.serving
            else self._describe_data()
        )
        return "\n".join(lines)

    def _describe_data(self) -> str:
        batch = "? (the loader has no batch_size)" if self.batch_size is None else self.batch_size
        text = (
            f"training data: {batch} samples per micro-batch per rank x {self.dp_size} "
            f"data-parallel ranks x {self.accumulation} micro-batch"
            f"{'' if self.accumulation == 1 else 'es'} per step"
        )
        if self.samples_per_step is not None:
            text += f" = {self.samples_per_step:,} samples per optimizer step"
        lengths = self.batches_per_rank
        if all(n is not None for n in lengths):
            shown = sorted({n for n in lengths if n is not None})
            count = str(shown[0]) if len(shown) == 1 else f"{shown[0]}-{shown[-1]}"
            text += f"; {count} batches per rank per epoch"
        if self.steps_per_epoch is None:
            return text + "; steps per epoch unknown (the loader has no length)"
        return text + f" -> {self.steps_per_epoch:,} steps per epoch"


def _per_rank(values: list[int]) -> str:
    if len(values) <= 8:
        return ", ".join(f"rank {r}: {v:,}" for r, v in enumerate(values))
    return f"min {min(values):,}, max {max(values):,} over {len(values)} ranks"


_MAX_PLACEMENT_ROWS = 40


def placement_of(param: torch.Tensor) -> str:
    """How ``param`` lies on the mesh: ``dp_shard_cp=Shard(0) tp=Replicate()``, or ``whole on
    each rank`` for a plain tensor (DDP, or no data parallelism)."""
    if not isinstance(param, DTensor):
        return "whole on each rank"
    names = param.device_mesh.mesh_dim_names or tuple(
        f"dim{i}" for i in range(param.device_mesh.ndim)
    )
    return " ".join(f"{n}={_placement(p)}" for n, p in zip(names, param.placements, strict=True))


def _placement(placement: Any) -> str:
    dim = getattr(placement, "dim", None)
    kind = type(placement).__name__.lstrip("_")  # _StridedShard, ... keep their own name
    return f"{kind}({dim})" if isinstance(dim, int) else kind


def parameter_placements(parts: list[nn.Module]) -> list[tuple[str, str]]:
    """``(names, placement)`` rows for the parameters of ``parts``, in order; names that differ
    only in a layer index are merged into one ``*`` row (with every placement they have)."""
    rows: dict[str, set[str]] = {}
    for part in parts:
        for name, param in part.named_parameters():
            pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)
            rows.setdefault(pattern, set()).add(placement_of(param))
    return [(pattern, " | ".join(sorted(where))) for pattern, where in rows.items()]


def _unique_parameters(parts: list[nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for part in parts:
        for param in part.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _loader_batch_size(loader: Any) -> int | None:
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(owner, "batch_size", None)
        if isinstance(size, int):
            return size
    return None


def _loader_length(loader: Any) -> int | None:
    try:
        return len(loader)
    except (TypeError, NotImplementedError):
        return None


def summarize(trainer: BaseTrainer) -> StartupSummary:
    """Collect the summary on every rank (a collective: every rank must call it)."""
    world = trainer.world
    local: list[float] = []
    names = list(trainer.model_parts())
    for parts in trainer.model_parts().values():
        params = _unique_parameters(parts)
        local += [
            sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad),
            sum(_local(p).numel() for p in params),
            sum(_local(p).numel() * _local(p).element_size() for p in params),
        ]
    loader = trainer.train_dataloader
    batch = _loader_batch_size(loader) if loader is not None else None
    length = _loader_length(loader) if loader is not None else None
    local += [-1 if batch is None else batch, -1 if length is None else length]
    mine = torch.tensor(local, dtype=torch.float64)
    rows = [mine]
    if world.world_size > 1:
        rows = [torch.empty_like(mine) for _ in range(world.world_size)]
        dist.all_gather(rows, mine, group=world.cpu_group)
    table = [[round(x) for x in row.tolist()] for row in rows]
    stages = world.pp_size if world.pp_enabled else 1
    models = {}
    for i, name in enumerate(names):
        column = [row[4 * i : 4 * i + 4] for row in table]
        models[name] = ModelSummary(
            parameters=round(sum(c[0] for c in column) / len(column) * stages),
            trainable=round(sum(c[1] for c in column) / len(column) * stages),
            local_elements=[c[2] for c in column],
            local_bytes=[c[3] for c in column],
        )
    batches = {row[-2] for row in table}
    lengths: list[int | None] = [None if row[-1] < 0 else row[-1] for row in table]
    training = trainer.config.training_parameters
    accum = training.gradient_accumulation_steps
    steps: int | None = None
    if all(n is not None for n in lengths):
        steps = min(n for n in lengths if n is not None) // accum
    if training.train_steps_per_epoch is not None:
        steps = (
            training.train_steps_per_epoch
            if steps is None
            else min(steps, training.train_steps_per_epoch)
        )
    placements = {
        name: parameter_placements(parts) for name, parts in trainer.model_parts().items()
    }
    return StartupSummary(
        placements=placements,
        models=models,
        batch_size=batches.pop() if len(batches) == 1 and -1 not in batches else None,
        batches_per_rank=lengths,
        dp_size=world.dp_size,
        accumulation=accum,
        steps_per_epoch=steps,
        serving=trainer.serving_only,
    )


def log_startup_summary(trainer: BaseTrainer) -> StartupSummary:
    """:func:`summarize` on every rank; rank 0 logs :meth:`StartupSummary.describe`."""
    summary = summarize(trainer)
    if trainer.world.is_global_zero:
        logger.info("%s", summary.describe())
    return summary
