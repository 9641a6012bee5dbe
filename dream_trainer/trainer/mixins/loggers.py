"""LoggerMixin: rank 0 sends reduced metrics to the console, a JSONL file, wandb and/or
TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dream_trainer.configs import LoggerConfigMixin, TrainerConfig
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.flops import declared_flops_per_token, peak_flops_for
from dream_trainer.trainer.performance import PerformanceReport
from dream_trainer.trainer.progress_bar import ProgressBar, open_progress_bar
from dream_trainer.trainer.startup_summary import StartupSummary, log_startup_summary
from dream_trainer.trainer.throughput import RankWindow

logger = logging.getLogger("dream_trainer.metrics")


class MetricSink(Protocol):
    """Somewhere metrics go."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class ConsoleSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        logger.info("step %d  %s", step, shown)

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per ``log`` call: ``{"step": ..., "time": ..., **metrics}``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """A wandb run, started on the first ``log``: by then CheckpointMixin has restored the id of
    the run a resumed training continues (``run_id()``), and ``resume="allow"`` continues it."""

    def __init__(
        self, config: TrainerConfig, mode: Any, run_dir: Path, run_id: Callable[[], str | None]
    ) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError(
                "logging_parameters.backends includes 'wandb' but wandb is not installed: "
                "pip install 'dream-trainer[wandb]'"
            ) from error
        self._wandb, self._config, self._mode, self._dir = wandb, config, mode, run_dir
        self._run_id = run_id
        self.run: Any = None
        """The wandb run once started (``None`` before the first ``log``)."""

    def start(self) -> Any:
        if self.run is None:
            wandb, config = self._wandb, self._config
            self._dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=config.project,
                name=config.experiment,
                config=config.model_dump(mode="json"),
                dir=str(self._dir),
                mode=self._mode,
                id=self._run_id(),
                resume="allow",
                reinit="finish_previous" if _wandb_accepts_reinit_string(wandb) else True,
            )
        return self.run

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.start().log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class TensorBoardSink:
    """Scalars for TensorBoard in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "logging_parameters.backends includes 'tensorboard' but tensorboard is not "
                "installed: pip install 'dream-trainer[tensorboard]'"
            ) from error
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


def new_wandb_run_id() -> str:
    """An id like wandb's own: 8 lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _wandb_accepts_reinit_string(wandb: Any) -> bool:
    version = tuple(int(p) for p in wandb.__version__.split(".")[:2] if p.isdigit())
    return version >= (0, 19)


class _LoggerConfig(LoggerConfigMixin, TrainerConfig):
    pass


class LoggerMixin(BaseTrainer):
    """Logs training metrics every ``log_every_n_steps`` and validation results, from rank 0."""

    config: _LoggerConfig  # type: ignore[assignment]

    balance_warning_every_n_windows: int = 10
    """Warn about unevenly loaded ranks at most once per this many log windows (per kind)."""

    @property
    def log_every_n_steps(self) -> int | None:
        return self.config.logging_parameters.log_every_n_steps

    def setup(self) -> None:
        super().setup()
        self.startup_summary: StartupSummary = log_startup_summary(self)  # every rank gathers
        self.performance: PerformanceReport | None = None
        if self.config.logging_parameters.performance_metrics:
            self.performance = PerformanceReport(self.world, self.balance_warning_every_n_windows)
        self.metric_sinks: list[MetricSink] = []
        params = self.config.logging_parameters
        # Saved in checkpoints; CheckpointMixin replaces it with the saved one when resuming.
        self.wandb_run_id: str | None = new_wandb_run_id() if "wandb" in params.backends else None
        if not self.world.is_global_zero or self.serving_only:  # no training metrics to log
            return
        for backend in params.backends:
            if backend == "console":
                self.metric_sinks.append(ConsoleSink())
            elif backend == "jsonl":
                self.metric_sinks.append(JsonlSink(self.run_dir / "metrics.jsonl"))
            elif backend == "tensorboard":
                self.metric_sinks.append(TensorBoardSink(self.run_dir / "tensorboard"))
            else:
                mode = params.wandb_mode or os.environ.get("WANDB_MODE") or "online"
                sink = WandbSink(self.config, mode, self.run_dir, lambda: self.wandb_run_id)
                self.metric_sinks.append(sink)

    def flops_per_token(self) -> float | None:
        """Training FLOPs (forward + backward) per token, for ``train/tflops_per_device`` and MFU.

        Default: the sum of what the models declare as ``flops_per_token`` (a number, or a method
        called with no arguments); ``None`` when none does.
        """
        return declared_flops_per_token(self.named_models().values())

    def peak_flops_per_device(self) -> float | None:
        """This device's peak FLOP/s for MFU: the dense BF16 figure of the table in flops.py,
        ``None`` (no MFU) for the CPU and unlisted devices."""
        return peak_flops_for(self.device)

    def train_window_metrics(self, window: RankWindow) -> dict[str, float]:
        metrics = super().train_window_metrics(window)
        performance = getattr(self, "performance", None)
        if performance is not None:
            flops = self.flops_per_token()
            peak = self.peak_flops_per_device()
            metrics.update(performance.metrics(window, self.global_step, flops, peak))
        return metrics

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        for sink in getattr(self, "metric_sinks", []):
            sink.log(metrics, step)
        bar: ProgressBar | None = getattr(self, "progress_bar", None)
        if bar is not None:
            bar.note_metrics(metrics, step)

    def _fit_loop(self) -> None:
        self.progress_bar: ProgressBar | None = open_progress_bar(self)  # rank 0, when wanted
        try:
            super()._fit_loop()
        finally:
            self._close_progress_bar()

    def after_train_step(self) -> None:
        super().after_train_step()
        bar: ProgressBar | None = getattr(self, "progress_bar", None)
        if bar is not None:
            bar.advance(self.global_step, self.current_epoch)

    def _close_progress_bar(self) -> None:
        bar, self.progress_bar = getattr(self, "progress_bar", None), None
        if bar is not None:
            bar.close()

    def teardown(self) -> None:
        try:
            self._close_progress_bar()
            for sink in getattr(self, "metric_sinks", []):
                sink.close()
        finally:
            self.metric_sinks = []
            super().teardown()
