"""Declarative parallelism: models describe their FSDP2 and tensor-parallel layout.

A model implements :class:`FullyShard` and/or :class:`ParallelPlan` on any of its
modules; :func:`apply_fully_shard` and :func:`apply_tensor_parallel` walk the tree and
apply them. Importing this package never imports torchao.
"""

from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.parallel.fully_shard import apply_fully_shard
from dream_trainer.parallel.grad_norm import (
    clip_grads_by_total_norm_,
    scale_grads_,
    total_grad_norm,
)
from dream_trainer.parallel.materialize import canonical_name, load_full_weights
from dream_trainer.parallel.protocols import (
    FullyShard,
    ParallelPlan,
    has_parallel_plan,
    implements_fully_shard,
    unwrap_compiled,
)
from dream_trainer.parallel.styles import (
    ParameterStyle,
    PlanTarget,
    StyleConstructor,
    colwise_parallel,
    parameter_parallel,
    prepare_module,
    prepare_module_input,
    prepare_module_output,
    rowwise_parallel,
    sequence_parallel,
)
from dream_trainer.parallel.tensor_parallel import PlanKeyError, apply_tensor_parallel

__all__ = [
    "FullyShard",
    "ParallelPlan",
    "ParameterStyle",
    "PlanKeyError",
    "PlanTarget",
    "StyleConstructor",
    "apply_fully_shard",
    "apply_tensor_parallel",
    "canonical_name",
    "clip_grads_by_total_norm_",
    "colwise_parallel",
    "declared_blocks",
    "has_parallel_plan",
    "implements_fully_shard",
    "load_full_weights",
    "parameter_parallel",
    "prepare_module",
    "prepare_module_input",
    "prepare_module_output",
    "rowwise_parallel",
    "scale_grads_",
    "sequence_parallel",
    "total_grad_norm",
    "unwrap_compiled",
]
