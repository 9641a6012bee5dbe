"""LoggerMixin: rank 0 sends reduced metrics to the console, a JSONL file and/or wandb."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from dream_trainer.configs import LoggerConfigMixin, TrainerConfig
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.flops import declared_flops_per_token, peak_flops_for
from dream_trainer.trainer.performance import PerformanceReport
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
    def __init__(self, config: TrainerConfig, mode: Any, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError(
                "logging_parameters.backends includes 'wandb' but wandb is not installed: "
                "pip install 'dream-trainer[wandb]'"
            ) from error
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=config.project,
            name=config.experiment,
            config=config.model_dump(mode="json"),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous" if _wandb_accepts_reinit_string(wandb) else True,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


def _wandb_accepts_reinit_string(wandb: Any) -> bool:
    version = tuple(int(p) for p in wandb.__version__.split(".")[:2] if p.isdigit())
    return version >= (0, 19)


class _LoggerConfig(LoggerConfigMixin, TrainerConfig):
    pass


class LoggerMixin(BaseTrainer):
    """Logs training metrics every ``log_every_n_steps`` and validation results, from rank 0."""

    config: _LoggerConfig  # type: ignore[assignment]

    log_performance_metrics: bool = False
    """Log throughput, MFU, memory and rank-balance metrics every log window (one extra
    all-gather of a few floats per window; see docs/logging-metrics.md). Off by default."""
    balance_warning_every_n_windows: int = 10
    """Warn about unevenly loaded ranks at most once per this many log windows (per kind)."""

    @property
    def log_every_n_steps(self) -> int | None:
        return self.config.logging_parameters.log_every_n_steps

    def setup(self) -> None:
        super().setup()
        self.startup_summary: StartupSummary = log_startup_summary(self)  # every rank gathers
        self.performance: PerformanceReport | None = None
        if self.log_performance_metrics:
            self.performance = PerformanceReport(self.world, self.balance_warning_every_n_windows)
        self.metric_sinks: list[MetricSink] = []
        if not self.world.is_global_zero:
            return
        params = self.config.logging_parameters
        for backend in params.backends:
            if backend == "console":
                self.metric_sinks.append(ConsoleSink())
            elif backend == "jsonl":
                self.metric_sinks.append(JsonlSink(self.run_dir / "metrics.jsonl"))
            else:
                mode = params.wandb_mode or os.environ.get("WANDB_MODE") or "online"
                self.metric_sinks.append(WandbSink(self.config, mode, self.run_dir))

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

    def teardown(self) -> None:
        try:
            for sink in getattr(self, "metric_sinks", []):
                sink.close()
        finally:
            self.metric_sinks = []
            super().teardown()
