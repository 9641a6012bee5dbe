"""Declarative parallelism: models describe their FSDP2 and tensor-parallel layout.

A model implements :class:`FullyShard` and/or :class:`ParallelPlan` on any of its
modules; :func:`apply_fully_shard` and :func:`apply_tensor_parallel` walk the tree and
apply them. Importing this package never imports torchao.
"""

from dream_trainer.parallel.fully_shard import apply_fully_shard
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
    "colwise_parallel",
    "has_parallel_plan",
    "implements_fully_shard",
    "parameter_parallel",
    "prepare_module",
    "prepare_module_input",
    "prepare_module_output",
    "rowwise_parallel",
    "sequence_parallel",
    "unwrap_compiled",
]
