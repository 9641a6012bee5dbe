"""Trainer configs. They compose like the trainer mixins: one config mixin per concern."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dream_trainer.configs.base import ConfigModel
from dream_trainer.configs.checkpoint import CheckpointParameters
from dream_trainer.configs.device import DeviceParameters
from dream_trainer.configs.training import TrainingParameters


class TrainerConfig(ConfigModel):
    """What every trainer needs: names, seed, layout and loop lengths."""

    project: str = "dream-trainer"
    experiment: str = "run"
    seed: int = 0
    """Seeds torch's RNG before weights are initialized and before training starts."""
    run_dir: str = "runs"
    """Each run writes its config, logs and checkpoints to ``{run_dir}/{project}/{experiment}/
    {run_id}``; ``{run_dir}/{project}/{experiment}/latest`` points at the newest."""
    run_id: str | None = None
    """Name of this run's directory; ``None``: torchrun's run id (kept across restarts) when it
    sets one, else a UTC timestamp with a random suffix, chosen on rank 0."""
    device_parameters: DeviceParameters = Field(default_factory=DeviceParameters)
    training_parameters: TrainingParameters = Field(default_factory=TrainingParameters)


class ModelSetupConfigMixin(ConfigModel):
    """Options of :class:`~dream_trainer.trainer.ModelSetupMixin`."""

    weight_init: Literal["full", "sharded"] = "full"
    """``full``: ``init_weights`` runs on one full CPU copy of each model, which is then
    distributed, so initial weights are identical under every layout (costs host memory for one
    full model). ``sharded``: ``init_weights`` runs on the sharded model in place (no extra
    memory; initial values then depend on the layout unless the init is DTensor-aware, as with
    ``dream_trainer.parallel.fill_blockwise_``)."""


MetricBackend = Literal["console", "jsonl", "wandb", "tensorboard"]
DEFAULT_BACKENDS: tuple[MetricBackend, ...] = ("console", "jsonl")


class LoggingParameters(ConfigModel):
    """Where training metrics go."""

    log_every_n_steps: int = Field(default=10, ge=1)
    """Reduce and log training metrics every N optimizer steps (each costs one collective)."""
    backends: list[MetricBackend] = Field(default_factory=lambda: list(DEFAULT_BACKENDS))
    """Where rank 0 sends metrics: the console, ``{run_dir}/{project}/{experiment}/metrics.jsonl``,
    wandb and/or TensorBoard (``{run_dir}/tensorboard``; ``pip install
    'dream-trainer[tensorboard]'``)."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """wandb's mode; ``offline`` writes runs locally for a later ``wandb sync``. ``None``: the
    ``WANDB_MODE`` environment variable decides, else ``online``."""
    performance_metrics: bool = True
    """Add throughput, MFU, memory and rank-balance metrics to every training log window (one
    extra all-gather of a few floats per window; see docs/logging-metrics.md)."""
    progress_bar: bool | Literal["auto"] = "auto"
    """Show a progress bar on rank 0 (epoch, step, loss, tokens/s, time left); ``"auto"``: only
    when stdout is a terminal. Uses ``tqdm`` when installed, else prints plain lines."""


class LoggerConfigMixin(ConfigModel):
    """Options of :class:`~dream_trainer.trainer.LoggerMixin`."""

    logging_parameters: LoggingParameters = Field(default_factory=LoggingParameters)


class CheckpointConfigMixin(ConfigModel):
    """Options of :class:`~dream_trainer.trainer.CheckpointMixin`."""

    checkpoint_parameters: CheckpointParameters = Field(default_factory=CheckpointParameters)


class DreamTrainerConfig(
    CheckpointConfigMixin, LoggerConfigMixin, ModelSetupConfigMixin, TrainerConfig
):
    """Config of :class:`~dream_trainer.DreamTrainer`; subclass it to add your own fields."""
