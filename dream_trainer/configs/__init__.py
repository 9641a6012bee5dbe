"""Typed, validated configuration (pydantic v2). Unknown keys are errors; JSON round-trips exactly."""

from dream_trainer.configs.auto_layout import AutoLayout
from dream_trainer.configs.base import ConfigModel, DType
from dream_trainer.configs.checkpoint import CheckpointParameters
from dream_trainer.configs.cli import (
    OverrideError,
    apply_overrides,
    config_from_command_line,
    parse_overrides,
)
from dream_trainer.configs.compute import ActivationCheckpointConfig, Float8Config
from dream_trainer.configs.device import (
    CommParameters,
    ContextParallelConfig,
    DeviceParameters,
    PipelineParallelConfig,
)
from dream_trainer.configs.trainer import (
    CheckpointConfigMixin,
    DreamTrainerConfig,
    LoggerConfigMixin,
    LoggingParameters,
    ModelSetupConfigMixin,
    TrainerConfig,
)
from dream_trainer.configs.training import BatchSizes, TrainingParameters, resolve_batch_sizes

__all__ = [
    "ActivationCheckpointConfig",
    "AutoLayout",
    "BatchSizes",
    "CheckpointConfigMixin",
    "CheckpointParameters",
    "CommParameters",
    "ConfigModel",
    "ContextParallelConfig",
    "DType",
    "DeviceParameters",
    "DreamTrainerConfig",
    "Float8Config",
    "LoggerConfigMixin",
    "LoggingParameters",
    "ModelSetupConfigMixin",
    "OverrideError",
    "PipelineParallelConfig",
    "TrainerConfig",
    "TrainingParameters",
    "apply_overrides",
    "config_from_command_line",
    "parse_overrides",
    "resolve_batch_sizes",
]
