"""When checkpoints are written, which are kept, and what a run resumes from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dream_trainer.configs.base import ConfigModel


class CheckpointParameters(ConfigModel):
    """Distributed (DCP) checkpoints in the run directory, and resuming from them."""

    enable: bool = False
    """Write checkpoints (always at the end of fit and on a clean interrupt, plus the cadence
    below) and resume from them."""
    every_n_steps: int | None = Field(default=None, ge=1)
    """Save every N optimizer steps."""
    every_n_minutes: float | None = Field(default=None, gt=0)
    """Save when this much wall time passed since the last save (checked after each step)."""
    keep_last: int | None = Field(default=None, ge=1)
    """Keep the newest k checkpoints (``None``: keep all)."""
    keep_best: int | None = Field(default=None, ge=1)
    """Also keep the k best by ``monitor``; a NaN value never counts as best."""
    monitor: str | None = None
    """Metric that ranks checkpoints for ``keep_best``, e.g. ``val_loss`` or ``train/loss``."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or a larger ``monitor`` value is better."""
    async_mode: Literal["off", "thread", "process"] = "off"
    """``off``: training waits for the write. ``thread``/``process``: training waits only while
    the state is copied to host memory; a background thread or process writes it."""
    resume: str = "auto"
    """``auto``: the newest complete checkpoint of this experiment, if any; ``never``; or the
    path of a checkpoint directory."""
    strict: bool = True
    """Loading fails on missing or unexpected model/optimizer keys (they are reported)."""
    allow_data_order_restart: bool = False
    """When the data-parallel degree changed and a dataloader cannot continue the global sample
    order, restart its epoch order instead of failing."""
    init_from: str | None = None
    """Initialize the models' weights (only) from this checkpoint before training."""
    init_strict: bool = True
    """Whether ``init_from`` must match every model key."""

    @model_validator(mode="after")
    def _monitor_for_best(self) -> CheckpointParameters:
        if self.keep_best is not None and self.monitor is None:
            raise ValueError(
                f"keep_best={self.keep_best} ranks checkpoints by a metric, but monitor is not "
                "set; give monitor (e.g. 'val_loss') or drop keep_best"
            )
        return self
