"""The layout planner: a trainer's real set-up for a cluster, on the meta device, in seconds.

:func:`plan_layout` builds the mesh of a ``world_size``-rank world and applies the trainer's
parallelization on the meta device, once per pipeline rank, in this process on torch's fake
process group; it then sizes every rank's parameters, gradients and optimizer state from their
DTensor placements, estimates FSDP's gathered parameters and the activations, and compares the
worst rank with the device memory. Nothing is materialized.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dream_trainer.configs import DeviceParameters
from dream_trainer.launch.activations import (
    ActivationEstimate,
    ActivationSettings,
    TransformerShape,
    estimate_activations,
    in_flight_microbatches,
)
from dream_trainer.launch.memory import coordinates, count_records, stage_ranks, total_bytes
from dream_trainer.launch.plan_report import Plan, RankGroup, RankMemory, parse_bytes
from dream_trainer.launch.rank_setup import RankRecords, set_up_rank
from dream_trainer.launch.script import trainer_from_script
from dream_trainer.trainer import BaseTrainer

TrainerSource = BaseTrainer | Callable[[], BaseTrainer] | str | os.PathLike[str]
"""A trainer (not launched), a function returning one, or the path of a training script."""


def load_trainer(source: TrainerSource, script_args: Sequence[str] = ()) -> BaseTrainer:
    """The trainer ``source`` names: itself, what the function returns, or the script's."""
    if isinstance(source, str | os.PathLike):
        return trainer_from_script(Path(source), script_args)
    if script_args:
        raise ValueError("script_args are the arguments of a script; pass them with a script path")
    trainer = source() if callable(source) and not isinstance(source, BaseTrainer) else source
    if not isinstance(trainer, BaseTrainer):
        raise TypeError(
            f"plan_layout needs a trainer, a function returning one or a script path; got "
            f"{type(trainer).__name__}"
        )
    return trainer


def transformer_shape(trainer: BaseTrainer) -> TransformerShape | None:
    """The trainer's ``transformer_shape()``, if it defines one."""
    method = getattr(trainer, "transformer_shape", None)
    if method is None:
        return None
    shape = method()
    if not isinstance(shape, TransformerShape):
        raise TypeError(
            f"{type(trainer).__name__}.transformer_shape() must return a "
            f"dream_trainer.launch.TransformerShape, not {type(shape).__name__}"
        )
    return shape


def plan_layout(
    trainer: TrainerSource,
    *,
    world_size: int,
    devices_per_node: int = 8,
    device_memory: int | str = "80GiB",
    script_args: Sequence[str] = (),
    device_parameters: DeviceParameters | None = None,
) -> Plan:
    """Set ``trainer`` up for ``world_size`` ranks on the meta device and size every rank.

    ``device_parameters`` replaces the trainer's own (for trying other layouts). Errors a real
    launch would raise at set-up (degrees, plans, splits, microbatches, sequence lengths) are
    raised here with the same message.
    """
    per_node = ranks_per_node(world_size, devices_per_node)
    memory = parse_bytes(device_memory)
    started = time.perf_counter()
    loaded = load_trainer(trainer, script_args)
    return _plan(
        loaded,
        world_size,
        per_node,
        memory,
        device_parameters,
        _source(trainer, script_args, loaded),
        started,
    )


def ranks_per_node(world_size: int, devices_per_node: int) -> int:
    """The ranks on each node: ``devices_per_node``, or the whole world when it is smaller."""
    if world_size < 1 or devices_per_node < 1:
        raise ValueError(
            f"world_size and devices_per_node must be positive, got {world_size} and "
            f"{devices_per_node}"
        )
    per_node = min(devices_per_node, world_size)
    if world_size % per_node:
        raise ValueError(
            f"world_size {world_size} is not a whole number of nodes of {devices_per_node} "
            "devices; plan the same number of ranks on every node (a multiple of "
            f"{devices_per_node})"
        )
    return per_node


def _source(trainer: Any, script_args: Sequence[str], loaded: BaseTrainer) -> str:
    if isinstance(trainer, str | os.PathLike):
        return " ".join([str(trainer), *script_args])
    return type(loaded).__name__


def plan_loaded(
    trainer: BaseTrainer,
    world_size: int,
    devices_per_node: int,
    device_memory: int,
    device_parameters: DeviceParameters | None,
    source: str,
) -> Plan:
    """:func:`plan_layout` for a trainer already loaded (the suggestions reuse one)."""
    return _plan(
        trainer,
        world_size,
        ranks_per_node(world_size, devices_per_node),
        device_memory,
        device_parameters,
        source,
        time.perf_counter(),
    )


def _plan(
    trainer: BaseTrainer,
    world_size: int,
    per_node: int,
    memory: int,
    given: DeviceParameters | None,
    source: str,
    started: float,
) -> Plan:
    params = given or trainer.config.device_parameters
    notes: list[str] = []
    if params.async_tensor_parallel:
        notes.append(
            "async_tensor_parallel is checked only on CUDA; planned without it (it changes no memory)"
        )
        params = params.model_copy(update={"async_tensor_parallel": False})
    if params.auto_layout is not None and params.auto_layout.device_memory is None:
        auto = params.auto_layout.model_copy(update={"device_memory": memory})
        params = params.model_copy(update={"auto_layout": auto})
    shape = transformer_shape(trainer)
    seq_len = shape.seq_len if shape is not None else None
    stages = [set_up_rank(trainer, params, world_size, per_node, 0, seq_len)]
    layout = stages[0].layout
    resolved = stages[0].device_parameters
    for pp_rank in range(1, layout.pp):
        rank = stage_ranks(layout, pp_rank)[0]
        stages.append(set_up_rank(trainer, resolved, world_size, per_node, rank, seq_len))
    groups = [
        g for pp_rank, stage in enumerate(stages) for g in _stage_groups(stage, pp_rank, shape)
    ]
    groups.sort(key=lambda g: (-g.memory.total, g.ranks[0]))
    for stage in stages:
        notes += [n for n in stage.notes + stage.warnings if n not in notes]
    first = stages[0]
    return Plan(
        source=source,
        world_size=world_size,
        devices_per_node=per_node,
        device_memory=memory,
        layout=layout,
        device_parameters=resolved,
        groups=tuple(groups),
        precision=_precision(resolved, first),
        optimizer=first.optimizer_kind,
        activations=_activation_summary(trainer, shape, first),
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


def _precision(params: DeviceParameters, records: RankRecords) -> str:
    stored = {r.itemsize for r in records.parameters}
    stored_text = "/".join(f"{b}-byte" for b in sorted(stored)) or "none"
    compute = str(params.param_dtype).removeprefix("torch.") if params.param_dtype else "as stored"
    reduce = (
        str(params.reduce_dtype).removeprefix("torch.") if params.reduce_dtype else "as computed"
    )
    return f"parameters stored {stored_text}, computed {compute}, gradients reduced {reduce}"


def _activation_summary(
    trainer: BaseTrainer, shape: TransformerShape | None, first: RankRecords
) -> str:
    if shape is None:
        return (
            f"not estimated: {type(trainer).__name__} defines no transformer_shape(); the totals "
            "count no activations"
        )
    params = first.device_parameters
    text = f"{shape.batch_size} x {shape.seq_len} tokens per step and data-parallel rank"
    if first.layout.pp > 1:
        schedule = params.pipeline_parallel_config.schedule
        text += f", {first.microbatches} microbatches ({schedule})"
    if params.checkpoint_activations:
        ac = params.activation_checkpoint_config
        every = "every block" if ac.every_n_blocks == 1 else f"every {ac.every_n_blocks}th block"
        text += f", {ac.mode} activation checkpointing of {every}"
    return text + " (analytic estimate, docs/scaling.md)"


def _stage_groups(
    records: RankRecords, pp_rank: int, shape: TransformerShape | None
) -> list[RankGroup]:
    layout, params = records.layout, records.device_parameters
    estimate = _activations(records, pp_rank, shape) if shape is not None else None
    activation_bytes = estimate.total if estimate is not None else 0
    counted = [count_records(r) for r in (records.parameters, records.gradients, records.optimizer)]
    units = [(count_records(u.records), u.kept) for u in records.units]
    by_memory: dict[RankMemory, list[int]] = {}
    for rank in stage_ranks(layout, pp_rank):
        coordinate = coordinates(layout, rank)
        parameters, gradients, optimizer = (total_bytes(c, coordinate, layout) for c in counted)
        memory = RankMemory(
            parameters=parameters,
            gradients=gradients,
            optimizer=optimizer,
            gathered=_gathered_bytes(records, units, coordinate),
            activations=activation_bytes,
            host=records.optimizer_host_bytes,
            offloaded=params.cpu_offload,
        )
        by_memory.setdefault(memory, []).append(rank)
    return [RankGroup(tuple(r), pp_rank, m, estimate) for m, r in by_memory.items()]


def _gathered_bytes(
    records: RankRecords, units: list[tuple[dict[Any, int], bool]], coordinate: dict[str, int]
) -> int:
    """Units kept gathered, two streamed units (running and prefetched), and the largest
    unit's unsharded gradients (plus their ``reduce_dtype`` copy) during its backward."""
    sizes = [(total_bytes(counts, coordinate, records.layout), kept) for counts, kept in units]
    if not sizes:
        return 0
    kept = sum(size for size, is_kept in sizes if is_kept)
    streamed = max((size for size, is_kept in sizes if not is_kept), default=0)
    largest = max(size for size, _ in sizes)
    grads = largest + largest * records.reduce_bytes // records.compute_bytes
    return kept + 2 * streamed + grads


def _activations(records: RankRecords, pp_rank: int, shape: TransformerShape) -> ActivationEstimate:
    layout, params = records.layout, records.device_parameters
    config = params.pipeline_parallel_config
    states: tuple[tuple[int, int, int], ...] = ((1, 0, 0),)
    head_in_flight, logits_held, buffers = 1, 1, 0
    if layout.pp > 1:
        m = records.microbatches
        states = tuple(
            in_flight_microbatches(config.schedule, pp_rank, layout.pp, m, records.stages)
        )
        # Only GPipe and LoopedBFS run every forward before the last stage's backward.
        head_in_flight = m if config.schedule in ("GPipe", "LoopedBFS") else 1
        logits_held, buffers = m, m * (records.stages - int(records.has_head))
    settings = ActivationSettings(
        compute_bytes=records.compute_bytes,
        tp=layout.tp,
        cp=layout.cp,
        cp_method=params.context_parallel_config.rotate_method,
        loss_parallel=params.loss_parallel,
        checkpoint=params.checkpoint_activations,
        checkpoint_mode=params.activation_checkpoint_config.mode,
        checkpoint_every=params.activation_checkpoint_config.every_n_blocks,
        microbatches=records.microbatches,
        schedule_states=states,
        blocks_per_stage=records.blocks / records.stages,
        has_head=records.has_head,
        head_in_flight=head_in_flight,
        logits_held=logits_held,
        pipeline_buffers=buffers,
    )
    return estimate_activations(shape, settings)
