"""Stop requests and time-based saves that every rank acts on at the same step."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopAndTimeFlags"]

logger = logging.getLogger("dream_trainer.checkpoint")


class StopAndTimeFlags:
    """Stop requests (SIGINT/SIGTERM) and time-based saves, agreed by every rank.

    Each step starts a non-blocking all-reduce of this rank's flags and reads the previous
    step's result, so all ranks act on the same step without waiting on each other.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.signal_name: str | None = None
        self._work: Any = None
        self._flags = torch.zeros(2)
        self._previous: dict[int, Any] = {}

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # a second one: stop now, without a checkpoint
            self.close()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping", self.signal_name
        )

    def agreed(self, seconds_since_save: float, every_minutes: float | None) -> tuple[bool, bool]:
        local = torch.tensor(
            [
                float(self.signal_name is not None),
                float(every_minutes is not None and seconds_since_save >= every_minutes * 60),
            ]
        )
        if self.group is None:
            return bool(local[0]), bool(local[1])
        previous = (False, False)
        if self._work is not None:
            self._work.wait()
            previous = (bool(self._flags[0]), bool(self._flags[1]))
        self._flags = local
        self._work = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return previous

    def close(self) -> None:
        if self._work is not None:
            with contextlib.suppress(RuntimeError):  # the group may be gone after a failure
                self._work.wait()
            self._work = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
