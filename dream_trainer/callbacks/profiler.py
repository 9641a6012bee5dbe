"""Profiler: a torch.profiler trace of a few training steps, written into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from dream_trainer.callbacks._common import (
    check_int,
    completes_step,
    is_global_zero,
    logger,
    run_at_teardown,
)
from dream_trainer.trainer import BaseTrainer, Callback


class Profiler(Callback[BaseTrainer]):
    """Profiles training steps with ``torch.profiler`` and writes the traces into the run dir.

    The schedule counts optimizer steps from the first training step of ``fit``: skip
    ``skip_first`` steps, then ``repeat`` cycles (0: until the end) of ``wait`` idle steps,
    ``warmup`` steps traced but discarded, and ``active`` recorded steps. Each finished cycle
    writes ``{run_dir}/profiler/rank{r}.<time>.pt.trace.json`` (open it in Perfetto or
    ``chrome://tracing``, or point TensorBoard at the directory). CPU activity is always
    recorded, CUDA activity when the trainer computes on a CUDA device. The profiler stops at
    the end of ``fit`` (normally, on an error or on Ctrl-C) even in the middle of a cycle;
    a cycle stopped while recording is written out. It never ends the process.

    ``wait``, ``warmup``, ``active``, ``repeat`` and ``skip_first`` are the
    ``torch.profiler.schedule``, in steps; ``record_shapes``, ``profile_memory`` and
    ``with_stack`` are passed to ``torch.profiler.profile``.
    """

    def __init__(
        self,
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        skip_first: int = 0,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        self.wait = check_int("Profiler", "wait", wait, 0, "give the idle steps per cycle")
        self.warmup = check_int("Profiler", "warmup", warmup, 0, "e.g. 1")
        self.active = check_int("Profiler", "active", active, 1, "record at least 1 step")
        self.repeat = check_int("Profiler", "repeat", repeat, 0, "0 repeats until the end")
        self.skip_first = check_int("Profiler", "skip_first", skip_first, 0, "e.g. 0")
        self.record_shapes = bool(record_shapes)
        self.profile_memory = bool(profile_memory)
        self.with_stack = bool(with_stack)
        self._profile: profile | None = None
        self._finished = False

    def pre_fit(self) -> None:
        self._finished = False

    @property
    def trace_dir(self) -> Path:
        """``{run_dir}/profiler``: where the traces go."""
        return Path(self.trainer.run_dir) / "profiler"

    def activities(self) -> list[ProfilerActivity]:
        """What is recorded: the CPU, and CUDA when the trainer's device is a CUDA device."""
        activities = [ProfilerActivity.CPU]
        if self.trainer.device.type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        return activities

    def pre_train_step(self, batch: Any, batch_idx: int) -> None:
        if self._profile is not None or self._finished:
            return
        rank = self.trainer.world.rank
        self._profile = profile(
            activities=self.activities(),
            schedule=schedule(
                wait=self.wait,
                warmup=self.warmup,
                active=self.active,
                repeat=self.repeat,
                skip_first=self.skip_first,
            ),
            on_trace_ready=tensorboard_trace_handler(
                str(self.trace_dir), worker_name=f"rank{rank}"
            ),
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        run_at_teardown(self.trainer, f"Profiler@{id(self)}", self._stop)
        self._profile.start()
        if is_global_zero(self.trainer):
            logger.info("profiling training steps into %s", self.trace_dir)

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        if self._profile is not None and completes_step(self.trainer):
            self._profile.step()

    def post_fit(self) -> None:
        self._stop()

    def on_interrupt(self) -> None:
        self._stop()

    def _stop(self) -> None:
        running, self._profile = self._profile, None
        if running is not None:
            self._finished = True
            running.stop()
