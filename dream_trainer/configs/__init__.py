"""Typed, validated configuration (pydantic v2). Unknown keys are errors; JSON round-trips exactly."""

from dream_trainer.configs.base import ConfigModel, DType, parse_dtype
from dream_trainer.configs.cli import apply_overrides, parse_overrides
from dream_trainer.configs.device import (
    DEGREE_FIELDS,
    PIPELINE_SCHEDULES,
    CommParameters,
    ContextParallelConfig,
    DeviceParameters,
    PipelineParallelConfig,
)
from dream_trainer.configs.trainer import (
    DreamTrainerConfig,
    LoggerConfigMixin,
    LoggingParameters,
    ModelSetupConfigMixin,
    TrainerConfig,
)
from dream_trainer.configs.training import TrainingParameters

__all__ = [
    "DEGREE_FIELDS",
    "PIPELINE_SCHEDULES",
    "CommParameters",
    "ConfigModel",
    "ContextParallelConfig",
    "DType",
    "DeviceParameters",
    "DreamTrainerConfig",
    "LoggerConfigMixin",
    "LoggingParameters",
    "ModelSetupConfigMixin",
    "PipelineParallelConfig",
    "TrainerConfig",
    "TrainingParameters",
    "apply_overrides",
    "parse_dtype",
    "parse_overrides",
]
