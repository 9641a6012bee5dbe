"""The training progress bar rank 0 shows on a terminal (``logging_parameters.progress_bar``).

It shows the epoch, the step out of the total (when known), the last logged ``train/loss``
and ``train/tokens_per_s``, and the time left. It uses ``tqdm`` when that is installed
(``pip install 'dream-trainer[progress]'``); without it the same facts are printed as one
plain line per log step. Log records of the framework go through the bar while it is open, so
they do not break it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import IO, Any, Literal

logger = logging.getLogger("dream_trainer.trainer")

ProgressBarSetting = bool | Literal["auto"]


def wants_progress_bar(setting: ProgressBarSetting, stream: IO[str]) -> bool:
    """``True``/``False`` decide; ``"auto"``: only when ``stream`` is a terminal (not in CI or
    under ``torchrun`` logs, where the console metric lines are the progress)."""
    if setting == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return bool(setting)


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class ProgressBar:
    """One bar over the optimizer steps of a ``fit``; rank 0 only (the trainer decides)."""

    def __init__(
        self,
        total: int | None,
        initial: int,
        epoch: int,
        stream: IO[str] | None = None,
        use_tqdm: bool = True,
    ) -> None:
        self.total = total
        self.step = initial
        self.epoch = epoch
        self.stream = stream if stream is not None else sys.stdout
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self._initial = initial
        self._start = time.perf_counter()
        self._closed = False
        self._last_line_step: int | None = None
        self._redirect: contextlib.ExitStack | None = None
        self._bar: Any = None
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    unit="step",
                    desc=self._describe(),
                    file=self.stream,
                    dynamic_ncols=True,
                )
                self._redirect = contextlib.ExitStack()
                loggers = [logging.getLogger(), logging.getLogger("dream_trainer")]
                self._redirect.enter_context(logging_redirect_tqdm(loggers, tqdm_class=tqdm))

    @property
    def uses_tqdm(self) -> bool:
        return self._bar is not None

    def _describe(self) -> str:
        return f"epoch {self.epoch}"

    def _postfix(self) -> dict[str, str]:
        shown = {}
        if self.loss is not None:
            shown["loss"] = f"{self.loss:.4g}"
        if self.tokens_per_s is not None:
            shown["tokens/s"] = f"{self.tokens_per_s:,.0f}"
        return shown

    def eta_seconds(self) -> float | None:
        """Time left at the mean pace of the steps this bar has seen; ``None`` before the first
        step or without a total."""
        done = self.step - self._initial
        if self.total is None or done <= 0:
            return None
        pace = (time.perf_counter() - self._start) / done
        return max(self.total - self.step, 0) * pace

    def line(self) -> str:
        """The plain form: ``epoch 0  step 20/100  loss 0.1234  tokens/s 1,234  eta 00:12``."""
        total = "?" if self.total is None else str(self.total)
        parts = [self._describe(), f"step {self.step}/{total}"]
        parts += [f"{k} {v}" for k, v in self._postfix().items()]
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"eta {_format_duration(eta)}")
        return "  ".join(parts)

    def advance(self, step: int, epoch: int) -> None:
        """After each optimizer step: ``step`` optimizer steps are done, in epoch ``epoch``."""
        if self._closed:
            return
        moved, self.step = step - self.step, step
        if epoch != self.epoch:
            self.epoch = epoch
            if self._bar is not None:
                self._bar.set_description_str(self._describe(), refresh=False)
        if self._bar is not None and moved > 0:
            self._bar.update(moved)

    def note_metrics(self, metrics: dict[str, float], step: int) -> None:
        """At a log step: keep ``train/loss`` and ``train/tokens_per_s``; the plain form prints
        its line once per training log step."""
        if self._closed or not any(k.startswith("train/") for k in metrics):
            return
        if "train/loss" in metrics:
            self.loss = float(metrics["train/loss"])
        if "train/tokens_per_s" in metrics:
            self.tokens_per_s = float(metrics["train/tokens_per_s"])
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(), refresh=False)
        elif self._last_line_step != step:
            self.step = max(self.step, step)
            self._last_line_step = step
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._bar is not None:
                self._bar.close()
        finally:
            if self._redirect is not None:
                self._redirect.close()


def planned_steps(max_steps: int | None, n_epochs: int, steps_per_epoch: int | None) -> int | None:
    """The optimizer steps ``fit`` will run in all: ``max_steps`` or ``n_epochs`` x steps per
    epoch, whichever comes first; ``None`` when neither is known."""
    by_epochs = None if steps_per_epoch is None else n_epochs * steps_per_epoch
    if max_steps is None:
        return by_epochs
    return max_steps if by_epochs is None else min(max_steps, by_epochs)


def open_progress_bar(trainer: Any, stream: IO[str] | None = None) -> ProgressBar | None:
    """The bar for ``trainer``'s ``fit`` (a LoggerMixin, set up), or ``None``: not rank 0, or
    ``logging_parameters.progress_bar`` says no."""
    stream = stream if stream is not None else sys.stdout
    setting = trainer.config.logging_parameters.progress_bar
    if not trainer.world.is_global_zero or not wants_progress_bar(setting, stream):
        return None
    training = trainer.config.training_parameters
    summary = getattr(trainer, "startup_summary", None)
    per_epoch = None if summary is None else summary.steps_per_epoch
    total = planned_steps(training.max_steps, training.n_epochs, per_epoch)
    return ProgressBar(total, trainer.global_step, trainer.current_epoch, stream)
