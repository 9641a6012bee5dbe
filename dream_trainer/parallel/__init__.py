"""Declarative parallelism: models describe their FSDP2 and tensor-parallel layout.

A model implements :class:`FullyShard` and/or :class:`ParallelPlan` on any of its
modules; :func:`apply_fully_shard` and :func:`apply_tensor_parallel` walk the tree and
apply them. The names and call forms are those of fsdp2-utils (``from fsdp2_utils import
...`` becomes ``from dream_trainer.parallel import ...``). Importing this package never
imports torchao. It also holds what the trainer's setup hooks use: layout-invariant
initialization (:func:`fill_blockwise_`), activation checkpointing (:func:`checkpoint_blocks`)
and float8 conversion (:func:`convert_to_float8`).
"""

from dream_trainer.parallel.activation_checkpointing import checkpoint_blocks
from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.parallel.compile import compile_module
from dream_trainer.parallel.context import (
    context_parallel_attention,
    global_sequence_length,
    sequence_positions,
)
from dream_trainer.parallel.float8 import convert_to_float8
from dream_trainer.parallel.fully_shard import apply_fully_shard, fully_shard
from dream_trainer.parallel.grad_norm import clip_grads_by_total_norm_, total_grad_norm
from dream_trainer.parallel.materialize import load_full_weights
from dream_trainer.parallel.protocols import FullyShard, ParallelPlan
from dream_trainer.parallel.sharded_init import block_seed, fill_blockwise_
from dream_trainer.parallel.styles import (
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
    "PlanKeyError",
    "StyleConstructor",
    "apply_fully_shard",
    "apply_tensor_parallel",
    "block_seed",
    "checkpoint_blocks",
    "clip_grads_by_total_norm_",
    "colwise_parallel",
    "compile_module",
    "context_parallel_attention",
    "convert_to_float8",
    "declared_blocks",
    "fill_blockwise_",
    "fully_shard",
    "global_sequence_length",
    "load_full_weights",
    "parameter_parallel",
    "prepare_module",
    "prepare_module_input",
    "prepare_module_output",
    "rowwise_parallel",
    "sequence_parallel",
    "sequence_positions",
    "total_grad_norm",
]
