"""Step timing and throughput: what each rank measures per log window, and the window's rates.

Each rank keeps a :class:`StepClock`. The loop wraps its batch iterator with
:meth:`StepClock.timed` (timing every ``next()`` of the loader), calls :meth:`StepClock.step_done`
when an optimizer step completes, and at a log point :meth:`StepClock.arrive` before the metric
all-reduce and :meth:`StepClock.take` after it. The clock only reads ``time.perf_counter()``: no
device synchronization and no collective. :func:`throughput_metrics` turns every rank's
:class:`RankWindow` (gathered once per log window) into rates.

A rank's timeline in one window::

    | gap | step 1 ........ | gap | step 2 ........ | ... | step n ........ | barrier |
          ^ first next()    ^ step_done                                   ^ arrive  ^ take
          | data | compute  |

* a *step* runs from the first ``next()`` of its first micro-batch to :meth:`step_done` (after
  the last micro-batch's ``training_step`` and ``post_train_step`` callbacks); it includes the
  time in ``next()`` (*data*);
* a *gap* (validation, checkpointing, logging, the previous log point's collectives) belongs to
  no step and is left out;
* the *barrier* is the log point's metric all-reduce: a rank that finished its steps early
  waits there for the others (and, on an accelerator, for its queued kernels).

Host times match device times where the step synchronizes with the device; the loop does every
step (the non-finite gradient-norm check reads the norm on the host).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dream_trainer.trainer.reduce import infer_batch_size

TokenCounter = Callable[[Any], "int | torch.Tensor | None"]


@dataclass(frozen=True)
class RankWindow:
    """What one rank measured between two log points (seconds are host wall-clock seconds)."""

    steps: int
    """Optimizer steps completed in the window."""
    step_s: float
    """Time inside the window's steps, data loading included."""
    data_s: float
    """Time inside ``next()`` of the training loader (part of ``step_s``)."""
    barrier_s: float
    """Time in the log point's metric all-reduce, waiting for the other ranks."""
    samples: int
    """Samples of the micro-batches this rank consumed (``infer_batch_size``)."""
    tokens: float | None
    """Tokens of those micro-batches per ``tokens_in_batch``; None when it gave no count."""

    @property
    def train_s(self) -> float:
        """The window's training time on this rank: its steps and the barrier that ends them."""
        return self.step_s + self.barrier_s

    @property
    def busy_fraction(self) -> float:
        """Share of ``train_s`` spent in steps but not in ``next()``: computing, not waiting."""
        return (self.step_s - self.data_s) / self.train_s if self.train_s > 0 else 0.0

    def as_list(self) -> list[float]:
        """Fixed-length numbers for one all-gather (see :meth:`from_list`)."""
        tokens = -1.0 if self.tokens is None else float(self.tokens)
        return [float(self.steps), self.step_s, self.data_s, self.barrier_s, self.samples, tokens]

    @classmethod
    def from_list(cls, values: list[float]) -> RankWindow:
        steps, step_s, data_s, barrier_s, samples, tokens = values
        return cls(
            steps=round(steps),
            step_s=step_s,
            data_s=data_s,
            barrier_s=barrier_s,
            samples=round(samples),
            tokens=None if tokens < 0 else tokens,
        )

    FIELDS = 6
    """Length of :meth:`as_list`."""


class StepClock:
    """Per-rank timing of steps, data waits and the log barrier; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._now = clock
        self._reset()
        self._step_start: float | None = None
        self._arrived: float | None = None

    def _reset(self) -> None:
        self._steps = 0
        self._step_s = 0.0
        self._data_s = 0.0
        self._samples = 0
        self._token_int = 0
        self._token_tensor: torch.Tensor | None = None
        self._tokens_known = True

    def timed(
        self, batches: Iterable[tuple[int, Any]], tokens_in_batch: TokenCounter | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``batches`` unchanged, timing each ``next()`` and counting samples and tokens.

        ``tokens_in_batch(batch)`` is called on each batch as the loader yields it (before it
        moves to the device); an int is summed on the host, a tensor on its device (read once
        per window), and ``None`` means this window reports no token counts.
        """
        iterator = iter(batches)
        while True:
            start = self._now()
            try:
                item = next(iterator)
            except StopIteration:
                # The epoch's end is no step's data wait; a step not yet started never will be.
                self._step_start = None
                return
            self._data_s += self._now() - start
            if self._step_start is None:
                self._step_start = start
            batch = item[1]
            self._samples += infer_batch_size(batch)
            count = tokens_in_batch(batch) if tokens_in_batch is not None else None
            if count is None:
                self._tokens_known = False
            elif isinstance(count, torch.Tensor):
                count = count.detach().reshape(()).to(torch.int64)  # every backend has int64
                total = self._token_tensor
                self._token_tensor = count if total is None else total + count.to(total.device)
            else:
                self._token_int += int(count)
            yield item

    def step_done(self) -> None:
        """An optimizer step completed (call after its last micro-batch's hooks)."""
        if self._step_start is not None:
            self._step_s += self._now() - self._step_start
            self._step_start = None
        self._steps += 1

    def arrive(self) -> None:
        """This rank reached a log point; its metric all-reduce (the barrier) starts now."""
        self._arrived = self._now()

    def take(self) -> RankWindow:
        """End the window after the log point's all-reduce: return it and start the next one."""
        now = self._now()
        barrier = now - self._arrived if self._arrived is not None else 0.0
        self._arrived = None
        tokens: float | None = None
        if self._tokens_known:
            tokens = float(self._token_int)
            if self._token_tensor is not None:  # one host read per window, never per step
                tokens += float(self._token_tensor.item())
        window = RankWindow(
            steps=self._steps,
            step_s=self._step_s,
            data_s=self._data_s,
            barrier_s=barrier,
            samples=self._samples,
            tokens=tokens,
        )
        self._reset()
        return window


def throughput_metrics(
    windows: list[RankWindow], dp_size: int, prefix: str = "train/"
) -> dict[str, float]:
    """Step time, samples/s and tokens/s (global and per device) and the data-wait fraction.

    ``windows`` holds every rank's window (index = global rank). Ranks of one data-parallel
    group (tensor, context and pipeline peers) consume the same samples, so the job's samples
    are the mean over ranks times ``dp_size``. The window lasts as long as the slowest rank's
    training time (``max train_s``): the ranks meet at the barrier, so this is the job's pace.
    """
    steps = windows[0].steps
    if steps <= 0:
        return {}
    world = len(windows)
    elapsed = max(w.train_s for w in windows)
    out: dict[str, float] = {f"{prefix}step_time_s": elapsed / steps}
    data_fractions = [w.data_s / w.train_s if w.train_s > 0 else 0.0 for w in windows]
    out[f"{prefix}data_wait_fraction"] = sum(data_fractions) / world
    out[f"{prefix}data_wait_fraction_max"] = max(data_fractions)
    if elapsed <= 0:
        return out
    samples = sum(w.samples for w in windows) / world * dp_size
    out[f"{prefix}samples_per_s"] = samples / elapsed
    out[f"{prefix}samples_per_s_per_device"] = samples / elapsed / world
    if all(w.tokens is not None for w in windows):
        tokens = sum(float(w.tokens or 0.0) for w in windows) / world * dp_size
        out[f"{prefix}tokens_per_s"] = tokens / elapsed
        out[f"{prefix}tokens_per_s_per_device"] = tokens / elapsed / world
    return out
