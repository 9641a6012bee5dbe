"""Per-batch context parallelism: each batch is cut along the sequence before a step sees it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from dream_trainer.parallel.context import ContextLayout, activated, shard_batch
from dream_trainer.world import DistributedWorld


class ContextParallelBatches:
    """Shards batches over the cp ranks and activates the layout attention reads.

    Without context parallelism batches pass through untouched. The first batch run under it
    must route attention through ``context_parallel_attention``; a model that computes
    attention some other way would attend within its shard only, so that is an error.
    """

    def __init__(self, world: DistributedWorld | None = None) -> None:
        self.layout: ContextLayout | None = None
        self.tp_multiple = 1
        self._checked = False
        if world is not None and world.cp_enabled:
            config = world.device_parameters.context_parallel_config
            mesh = world.get_mesh("cp")
            self.layout = ContextLayout(
                mesh.get_group(),
                mesh.size(),
                mesh.get_local_rank(),
                load_balance=config.load_balance,
                rotate_method=config.rotate_method,
            )
            # Sequence-parallel regions split each rank's share over the TP ranks again.
            self.tp_multiple = world.tp_size

    def batch(self, batch: Any, what: str) -> AbstractContextManager[Any]:
        """This rank's share of ``batch``, with the layout active while the step runs."""
        if self.layout is None:
            return nullcontext(batch)  # entered per micro-batch: no generator-based context
        return self._sharded(batch, self.layout, what)

    @contextmanager
    def _sharded(self, batch: Any, layout: ContextLayout, what: str) -> Iterator[Any]:
        local = shard_batch(batch, layout, multiple=self.tp_multiple)
        layout.attention_calls = 0
        with activated(layout):
            try:
                yield local
            except Exception as error:
                if self._checked or layout.attention_calls:
                    raise
                raise RuntimeError(
                    f"{self._bypassed(what)} The step failed with {type(error).__name__}: {error}"
                ) from error
        self.check_attention_used(what)

    def check_attention_used(self, what: str) -> None:
        """Raise unless the running step's attention went through the layout (checked once)."""
        layout = self.layout
        if layout is None or self._checked:
            return
        if layout.attention_calls == 0:
            raise RuntimeError(self._bypassed(what))
        self._checked = True

    def _bypassed(self, what: str) -> str:
        assert self.layout is not None
        return (
            f"context_parallel={self.layout.size} cuts each sequence over the cp ranks, but the "
            f"{what} step computed no attention through dream_trainer.parallel."
            "context_parallel_attention: each rank would attend within its own shard only. "
            "Call context_parallel_attention(q, k, v, ...) in the model instead of "
            "scaled_dot_product_attention (and sequence_positions for rotary embeddings), or "
            "set context_parallel=1."
        )
