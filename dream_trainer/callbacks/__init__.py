"""Ready-made callbacks: monitoring, weight averaging, early stopping, gc and profiling.

A layer above :mod:`dream_trainer.trainer`: these use only the trainer's public hooks and
attributes, and nothing in the trainer imports them. Pass instances to the trainer with
``callbacks=[...]``; see docs/callbacks.md.
"""

from dream_trainer.callbacks.early_stopping import EarlyStopping
from dream_trainer.callbacks.ema import EMA
from dream_trainer.callbacks.garbage_collection import GarbageCollection
from dream_trainer.callbacks.learning_rate import LearningRateMonitor
from dream_trainer.callbacks.non_finite import NonFiniteGradMonitor
from dream_trainer.callbacks.profiler import Profiler

__all__ = [
    "EMA",
    "EarlyStopping",
    "GarbageCollection",
    "LearningRateMonitor",
    "NonFiniteGradMonitor",
    "Profiler",
]
