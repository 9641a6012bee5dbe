"""Where this rank is: the training loop's step and phase, kept for the hang watchdog.

The loop marks each phase it enters (:class:`Phase` names the ones the trainer uses); a mark is
two attribute writes and a clock read, with no device synchronization and no collective, so it
costs nothing measurable per step. One thread (the loop's) writes; any thread may read: a mark
replaces one immutable :class:`Position`, and reading the attribute is atomic in CPython.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple, TypeVar

__all__ = ["Phase", "Position", "Progress"]

T = TypeVar("T")


class Phase:
    """The phase names the trainer marks (a user may mark any other string)."""

    SETUP = "setup"
    """Launch, configure and setup (before the watchdog runs)."""
    START = "start of fit"
    """The ``pre_fit`` callbacks (sanity validation marks ``validation``)."""
    DATA = "data"
    """Waiting for the next batch (the dataloader, and agreeing on batch counts)."""
    FORWARD_BACKWARD = "forward-backward"
    """Inside ``training_step`` (except in ``self.step``)."""
    OPTIMIZER = "optimizer"
    """Inside ``self.step(optimizer)``: token normalization, gradient norm, clipping, step."""
    TRAIN_METRICS = "all-reduce train metrics"
    VALIDATION = "validation"
    """Inside ``validation_step`` (its batches are fetched in ``data``)."""
    VALIDATION_METRICS = "all-reduce validation metrics"
    CHECKPOINT = "checkpoint"
    """After a step's logging and validation: checkpoint saves and stop-signal agreement."""
    FINISH = "end of fit"
    """After the last step: the final checkpoint and the ``post_fit`` callbacks."""


class Position(NamedTuple):
    """One mark: the step (optimizer steps completed), the phase, and when it was entered."""

    step: int
    phase: str
    since: float
    """``time.monotonic()`` when the phase was entered."""
    marks: int
    """How many marks this record has taken: it changes whenever the rank moves on."""

    def seconds_in_phase(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.since


class Progress:
    """The current :class:`Position` of this rank, and the phases it has already finished once."""

    def __init__(self) -> None:
        self._position = Position(0, Phase.SETUP, time.monotonic(), 0)
        self._finished: set[str] = set()

    @property
    def position(self) -> Position:
        return self._position

    def mark(self, phase: str, step: int | None = None) -> None:
        """Enter ``phase`` at ``step`` (``None``: the step of the last mark)."""
        previous = self._position
        if previous.phase != phase:
            self._finished.add(previous.phase)
        # A tuple (not a frozen dataclass, whose __init__ costs several times more): the loop
        # marks a few times per micro-batch.
        self._position = Position(
            previous.step if step is None else step, phase, time.monotonic(), previous.marks + 1
        )

    def has_finished(self, phase: str) -> bool:
        """Whether ``phase`` was entered and left at least once (its first run may be slow)."""
        return phase in self._finished

    def during(self, phase: str) -> _During:
        """Mark ``phase`` for the body, then the phase that was current before it."""
        return _During(self, phase)

    def each(self, items: Iterable[T], phase: str) -> Iterator[T]:
        """Yield ``items``, marking ``phase`` before fetching each one (and before the end)."""
        iterator = iter(items)
        while True:
            self.mark(phase)
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item


class _During:
    """:meth:`Progress.during`'s context: a plain class (the optimizer step enters one per step,
    and a generator-based context costs several times more)."""

    __slots__ = ("_before", "_phase", "_progress")

    def __init__(self, progress: Progress, phase: str) -> None:
        self._progress, self._phase, self._before = progress, phase, ""

    def __enter__(self) -> None:
        self._before = self._progress.position.phase
        self._progress.mark(self._phase)

    def __exit__(self, *exc_info: object) -> None:
        self._progress.mark(self._before)
