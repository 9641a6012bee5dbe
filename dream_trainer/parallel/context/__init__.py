"""Context parallelism: sequences split over ranks per batch, and the attention that spans them."""

from dream_trainer.parallel.context.attention import context_parallel_attention
from dream_trainer.parallel.context.layout import (
    ContextLayout,
    activated,
    active_layout,
    global_sequence_length,
    sequence_positions,
)
from dream_trainer.parallel.context.sharding import shard_batch

__all__ = [
    "ContextLayout",
    "activated",
    "active_layout",
    "context_parallel_attention",
    "global_sequence_length",
    "sequence_positions",
    "shard_batch",
]
