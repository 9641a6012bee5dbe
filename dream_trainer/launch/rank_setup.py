"""Set up one rank of a trainer on the meta device, in a fake world, and record what it holds.

The trainer's own hooks run as in ``fit()`` (launch, batch sizes, ``configure``, pipeline split,
TP, CP, AC, compile, FSDP/replicate, pipeline assembly, optimizers and schedulers) and the same
checks, so a layout a real launch refuses fails here with the same message. Models are never
materialized and ``init_weights`` never runs; dataloaders and callbacks are not built or called.
"""

from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from dream_trainer.configs import DeviceParameters
from dream_trainer.launch.memory import TensorRecord, record_of, unique_parameters
from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.parallel.pipeline.schedule import check_microbatches, schedule_class
from dream_trainer.trainer import BaseTrainer, ModelSetupMixin
from dream_trainer.trainer.checks import (
    check_data_parallel_coverage,
    check_one_device_per_model,
    check_tensor_parallel_applied,
)
from dream_trainer.trainer.context_batches import ContextParallelBatches
from dream_trainer.trainer.mixins.registry import assigned_during
from dream_trainer.world import DistributedWorld, MeshLayout
from dream_trainer.world.environment import LaunchEnvironment


@dataclass
class GatheredUnit:
    """One FSDP unit: what it all-gathers (TP-local shapes, in the compute dtype)."""

    records: list[TensorRecord]
    kept: bool
    """Not resharded after forward: gathered from forward until its backward."""


@dataclass
class RankRecords:
    """Everything the planner sizes for the ranks of one pipeline stage."""

    layout: MeshLayout
    device_parameters: DeviceParameters
    parameters: list[TensorRecord] = field(default_factory=list)
    gradients: list[TensorRecord] = field(default_factory=list)
    optimizer: list[TensorRecord] = field(default_factory=list)
    optimizer_host_bytes: int = 0
    optimizer_kind: str = ""
    units: list[GatheredUnit] = field(default_factory=list)
    reduce_bytes: int = 0
    """Element size of gradients while FSDP reduces them, when it differs from the compute
    dtype (a ``reduce_dtype`` copy); 0 otherwise."""
    compute_bytes: int = 4
    blocks: int = 0
    stages: int = 1
    has_head: bool = True
    microbatches: int = 1
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """torch's fake process group as rank ``rank`` of ``world_size`` (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "a process group already exists in this process; the planner starts its own fake "
            "one, so plan from a process without torch.distributed initialized"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def _warnings_collected() -> Iterator[list[str]]:
    """The warnings Dream Trainer logs meanwhile, kept for the plan instead of printed."""
    root = logging.getLogger("dream_trainer")
    handler, propagate = _Collect(), root.propagate
    root.addHandler(handler)
    root.propagate = False
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.propagate = propagate


def set_up_rank(
    trainer: BaseTrainer,
    params: DeviceParameters,
    world_size: int,
    devices_per_node: int,
    rank: int,
    seq_len: int | None,
) -> RankRecords:
    """Set ``trainer`` up as ``rank`` of a fake world on the meta device and record it.

    ``trainer.world`` and ``trainer.config`` are restored afterwards; its models and
    optimizers stay as the meta set-up left them.
    """
    if not isinstance(trainer, ModelSetupMixin):
        raise TypeError(
            f"the planner sets up models through configure_models, but {type(trainer).__name__} "
            "is not a ModelSetupMixin; subclass DreamTrainer"
        )
    saved_world, saved_config = trainer.world, trainer.config
    env = LaunchEnvironment(
        rank=rank,
        world_size=world_size,
        local_rank=rank % devices_per_node,
        local_world_size=devices_per_node,
        source="existing",
    )
    world = DistributedWorld(
        params, device="cpu", environment=env, model_size=trainer.measure_model_size
    )
    with fake_process_group(rank, world_size), _warnings_collected() as warned:
        trainer.world = world
        try:
            world.launch()
            records = _set_up(trainer, world, seq_len)
        finally:
            world.destroy()
            trainer.world, trainer.config = saved_world, saved_config
            getattr(trainer, "__dict__", {}).pop("_meta_models", None)
    records.warnings = list(warned)
    return records


def _set_up(trainer: ModelSetupMixin, world: DistributedWorld, seq_len: int | None) -> RankRecords:
    trainer._apply_batch_sizes()
    torch.manual_seed(trainer.config.seed)
    trainer.configure()
    name = type(trainer).__name__
    check_one_device_per_model(trainer.named_models(), world.world_size)
    trainer._split_into_parts()
    trainer._parallelize_parts()
    labelled = {
        f"{model}[{i}]": part
        for model, parts in trainer.model_parts().items()
        for i, part in enumerate(parts)
    }
    if world.tp_enabled:
        check_tensor_parallel_applied(labelled, name)
    check_data_parallel_coverage(labelled, world, name)
    params = world.device_parameters
    records = RankRecords(world.layout, params)
    if world.layout_choice is not None:
        records.notes.append(world.layout_choice.describe())
    if world.pp_enabled:
        config = params.pipeline_parallel_config
        schedule_class(config.schedule)
        per_device = trainer.batch_sizes.per_device if trainer.batch_sizes else None
        records.microbatches = check_microbatches(
            config, trainer.pipeline_num_stages, world.pp_size, per_device
        )
        trainer._assemble_pipelines()
        records.has_head = trainer.pipeline_num_stages - 1 in trainer.pipeline_stage_indices()
    if world.cp_enabled and seq_len is not None:
        batches = ContextParallelBatches(world)
        assert batches.layout is not None
        batches.layout.check_length(seq_len, batches.tp_multiple)
    parts = [part for parts in trainer.model_parts().values() for part in parts]
    records.stages = max(len(p) for p in trainer.model_parts().values())
    records.blocks = sum(len(declared_blocks(part)) for part in parts)
    _record_parameters(records, parts, world)
    _record_optimizers(records, trainer, parts)
    return records


def _record_parameters(
    records: RankRecords, parts: list[nn.Module], world: DistributedWorld
) -> None:
    params = world.device_parameters
    shard_dim = _fsdp_shard_dim(world)
    stored = [p.dtype for _, p in unique_parameters(parts) if p.is_floating_point()]
    compute = params.param_dtype or (stored[0] if stored else torch.float32)
    records.compute_bytes = compute.itemsize
    reduce = params.reduce_dtype
    records.reduce_bytes = reduce.itemsize if reduce is not None and reduce != compute else 0
    for _, param in unique_parameters(parts):
        record = record_of(param, shard_dim)
        records.parameters.append(record)
        if param.requires_grad:
            # FSDP2 casts the reduced gradient back to the stored dtype, into a buffer of the
            # padded shard size; without FSDP the gradient is the parameter's shape and dtype.
            records.gradients.append(record)
    records.units = _gathered_units(parts, compute, records.notes)


def _fsdp_shard_dim(world: DistributedWorld) -> str | None:
    names = world.fsdp_config["mesh"].mesh_dim_names
    return names[-1] if names else None


def _gathered_units(
    parts: list[nn.Module], compute: torch.dtype, notes: list[str]
) -> list[GatheredUnit]:
    units, seen = [], set()
    for part in parts:
        for module in part.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = getattr(module, "_get_fsdp_state", lambda: None)()
            group = getattr(state, "_fsdp_param_group", None)
            if group is None or id(group) in seen:
                continue
            seen.add(id(group))
            fsdp_params = getattr(group, "fsdp_params", None)
            if fsdp_params is None:  # pragma: no cover - depends on torch's FSDP internals
                notes.append("FSDP's gathered parameters are not estimated on this torch version")
                return []
            unit = []
            for fsdp_param in fsdp_params:
                sharded = fsdp_param.sharded_param
                unit.append(_unsharded_record(sharded, compute))
            kept = getattr(group, "post_forward_mesh_info", True) is None
            units.append(GatheredUnit(unit, kept))
    return units


def _unsharded_record(param: torch.Tensor, compute: torch.dtype) -> TensorRecord:
    """What FSDP all-gathers for ``param``: its shape after the non-FSDP (TP) placements."""
    record = record_of(param)
    if not isinstance(param, DTensor):
        return TensorRecord(record.shape, compute.itemsize)
    tp_only = tuple(
        p if name in ("tp", "cp") else Replicate()
        for name, p in zip(record.mesh_dims, record.placements)
    )
    return TensorRecord(record.shape, compute.itemsize, record.mesh_dims, tp_only)


def _record_optimizers(records: RankRecords, trainer: Any, parts: list[nn.Module]) -> None:
    with assigned_during(trainer, lambda v: isinstance(v, torch.optim.Optimizer)) as optimizers:
        trainer.configure_optimizers()
    if not optimizers:
        raise RuntimeError(
            f"{type(trainer).__name__}.configure_optimizers assigned no torch.optim.Optimizer "
            "to self (e.g. self.optimizer = torch.optim.AdamW(self.model.parameters()))"
        )
    trainer._optimizer_names = list(optimizers)
    with assigned_during(trainer, lambda v: isinstance(v, torch.optim.lr_scheduler.LRScheduler)):
        trainer.configure_schedulers()
    trainer._check_optimized_parameters()
    kinds = ", ".join(sorted({type(opt).__name__ for opt in optimizers.values()}))
    try:
        for opt in optimizers.values():
            _record_states(records, opt)
    except Exception as error:  # the optimizer needs real values: fall back to its known state
        records.optimizer, records.optimizer_host_bytes = [], 0
        records.optimizer_kind = _assumed_states(records, list(optimizers.values()), parts)
        records.notes.append(
            f"the optimizer step does not run on the meta device ({type(error).__name__}: "
            f"{error}); {records.optimizer_kind}"
        )
        return
    records.optimizer_kind = f"{kinds} (its state measured by one step on meta)"


def _record_states(records: RankRecords, opt: torch.optim.Optimizer) -> None:
    """Step a copy of ``opt`` over plain meta tensors of the parameters' global shapes (fast:
    no DTensor dispatch) and record each state like its parameter: a state of the parameter's
    shape is sharded as the parameter (without FSDP2's padding: ``zeros_like`` of a shard)."""
    originals = [p for g in opt.param_groups for p in g["params"]]
    shadows = {id(p): _shadow(p) for p in originals}
    shadow = copy.copy(opt)
    shadow.param_groups = [
        {**group, "params": [shadows[id(p)] for p in group["params"]]} for group in opt.param_groups
    ]
    shadow.state = collections.defaultdict(dict)
    # type(opt).step: an LR scheduler wraps the instance's step, which copy.copy would share.
    type(opt).step(shadow)
    for param in originals:
        for value in shadow.state.get(shadows[id(param)], {}).values():
            if not isinstance(value, torch.Tensor):
                continue
            if value.device.type != "meta":  # e.g. Adam's step counts, on the host unless fused
                records.optimizer_host_bytes += value.numel() * value.element_size()
            elif isinstance(param, DTensor) and value.shape == param.shape:
                record = record_of(param)
                itemsize = value.element_size()
                records.optimizer.append(
                    TensorRecord(record.shape, itemsize, record.mesh_dims, record.placements)
                )
            else:
                records.optimizer.append(record_of(value))


def _shadow(param: torch.Tensor) -> nn.Parameter:
    shadow = nn.Parameter(
        torch.empty(param.shape, dtype=param.dtype, device="meta"),
        requires_grad=param.requires_grad,
    )
    if param.requires_grad:
        shadow.grad = torch.zeros_like(shadow)
    return shadow


def _assumed_states(
    records: RankRecords, optimizers: list[torch.optim.Optimizer], parts: list[nn.Module]
) -> str:
    """Optimizer state by the optimizer's kind: Adam(W) 2 (3 with amsgrad), SGD 1 with
    momentum, anything else assumed AdamW. Returns how it was counted."""
    described = []
    for opt in optimizers:
        name = type(opt).__name__
        if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            per = 3 if any(g.get("amsgrad") for g in opt.param_groups) else 2
            how = f"{name}: {per} states per trainable parameter"
        elif isinstance(opt, torch.optim.SGD):
            per = int(any(g.get("momentum", 0) for g in opt.param_groups))
            how = f"{name}: {per} state per trainable parameter"
        else:
            per, how = 2, f"{name} is not known to the planner: assumed AdamW (2 states)"
        held = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
        for _, param in unique_parameters(parts):
            if id(param) in held:
                record = record_of(param)
                records.optimizer.extend([record] * per)
        described.append(how)
    return "; ".join(described) + ", each the parameter's shape and dtype"
