"""Counting a trainer's models for the automatic layout, on the meta device, then forgetting them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dream_trainer.parallel import ParallelPlan
from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.trainer.mixins.meta_placement import MovesStayOnMeta
from dream_trainer.trainer.mixins.model_aliases import drop_aliases
from dream_trainer.trainer.mixins.registry import assigned_during
from dream_trainer.world import ModelSize


def _is_model(value: Any) -> bool:
    return isinstance(value, nn.Module) and any(True for _ in value.parameters())


def size_of_models(models: dict[str, nn.Module], tensor_parallel: bool = False) -> ModelSize:
    """Parameters of ``models`` (a tied weight once), trainable ones, bytes per parameter and
    the largest unit FSDP gathers: a declared block, or what a root holds outside its blocks.

    ``tensor_parallel``: the trainer can split them without a plan (it overrides the hook).
    """
    seen: set[int] = set()
    total = trainable = stored = largest = 0
    for model in models.values():
        in_blocks: set[int] = set()
        for block in declared_blocks(model):
            ids = {id(p): p for p in block.parameters()}
            in_blocks |= set(ids)
            largest = max(largest, sum(p.numel() for p in ids.values()))
        outside = {id(p): p for p in model.parameters() if id(p) not in in_blocks}
        largest = max(largest, sum(p.numel() for p in outside.values()))
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            stored += param.numel() * param.element_size()
            trainable += param.numel() if param.requires_grad else 0
    planned = any(isinstance(m, ParallelPlan) for model in models.values() for m in model.modules())
    return ModelSize(
        parameters=total,
        trainable=trainable,
        bytes_per_parameter=stored / total if total else 4.0,
        largest_block=largest,
        tensor_parallel=tensor_parallel or planned,
    )


def measure_configured_models(
    trainer: Any, configure_models: Callable[[], None], tensor_parallel: bool
) -> ModelSize:
    """Run ``configure_models`` on the meta device, size what it assigned to ``trainer``, and
    restore the trainer's attributes as they were, so that ``configure`` starts afresh."""
    saved = dict(vars(trainer))
    try:
        with assigned_during(trainer, _is_model) as found, torch.device("meta"), MovesStayOnMeta():
            configure_models()
        models = drop_aliases(found)
        if not models:
            raise RuntimeError(
                f"{type(trainer).__name__}.configure_models assigned no nn.Module with "
                "parameters to self, so the automatic layout has nothing to size (e.g. "
                "self.model = MyModel())"
            )
        return size_of_models(models, tensor_parallel)
    finally:
        vars(trainer).clear()
        vars(trainer).update(saved)
