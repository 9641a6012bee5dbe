"""Data-parallel batch inference: every item once, results in input order.

:func:`distributed_map` for lists held in memory, :func:`distributed_map_to_jsonl` for whole
datasets streamed to a resumable JSONL file. The trainer's ``predict`` runs on these.
"""

from dream_trainer.inference.engine import InferenceEngine
from dream_trainer.inference.jsonl_results import JsonlResultFile
from dream_trainer.inference.ordered import FailedShare, InferenceError, distributed_map
from dream_trainer.inference.replicas import Replicas
from dream_trainer.inference.split import even_split
from dream_trainer.inference.streaming import StreamSummary, distributed_map_to_jsonl

__all__ = [
    "FailedShare",
    "InferenceEngine",
    "InferenceError",
    "JsonlResultFile",
    "Replicas",
    "StreamSummary",
    "distributed_map",
    "distributed_map_to_jsonl",
    "even_split",
]
