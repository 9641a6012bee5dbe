"""Pipeline parallelism: stages cut from a model with its parameter names kept, and their schedule."""

from dream_trainer.parallel.pipeline.parts import ModelParts, merge_parts
from dream_trainer.parallel.pipeline.runner import PipelineRunner
from dream_trainer.parallel.pipeline.schedule import stage_indices
from dream_trainer.parallel.pipeline.split import (
    SparseModuleList,
    balanced_stages,
    split_model,
    stage_modules,
)

__all__ = [
    "ModelParts",
    "PipelineRunner",
    "SparseModuleList",
    "balanced_stages",
    "merge_parts",
    "split_model",
    "stage_indices",
    "stage_modules",
]
