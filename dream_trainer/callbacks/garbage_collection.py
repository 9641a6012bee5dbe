"""GarbageCollection: no automatic collections during training, one every N steps instead."""

from __future__ import annotations

import gc
import time
from typing import Any

from dream_trainer.callbacks._common import check_int, completes_step, logger, run_at_teardown
from dream_trainer.trainer import BaseTrainer, Callback


class GarbageCollection(Callback[BaseTrainer]):
    """Disables Python's automatic garbage collection for the run and collects every N steps.

    An automatic collection can start on any rank at any moment and hold it up while the
    others wait in a collective; collecting at the same steps on every rank keeps them in step.
    From ``pre_fit`` to the end of ``fit`` automatic collection is off, and after every
    ``every_n_steps``-th optimizer step ``gc.collect(generation)`` runs. When ``fit`` ends
    (normally, on an error or on Ctrl-C) automatic collection is switched back on if it was
    on before.

    Args:
        every_n_steps: collect after global steps that are multiples of this.
        generation: the oldest generation collected, 0, 1 or 2 (2: a full collection).
    """

    def __init__(self, every_n_steps: int = 50, generation: int = 1) -> None:
        self.every_n_steps = check_int(
            "GarbageCollection", "every_n_steps", every_n_steps, 1, "e.g. 50"
        )
        self.generation = check_int(
            "GarbageCollection", "generation", generation, 0, "give 0, 1 or 2 (2 collects all)"
        )
        if generation > 2:
            raise ValueError(
                f"GarbageCollection(generation={generation!r}): Python has generations 0, 1 and "
                "2; give 2 for a full collection"
            )
        self.collections = 0
        """Collections this callback ran."""
        self._was_enabled: bool | None = None

    def pre_fit(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        run_at_teardown(self.trainer, f"GarbageCollection@{id(self)}", self._restore)

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        if completes_step(self.trainer) and self.trainer.global_step % self.every_n_steps == 0:
            start = time.perf_counter()
            gc.collect(self.generation)
            self.collections += 1
            logger.debug(
                "gc.collect(%d) after step %d took %.3f s",
                self.generation,
                self.trainer.global_step,
                time.perf_counter() - start,
            )

    def post_fit(self) -> None:
        self._restore()

    def on_interrupt(self) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
