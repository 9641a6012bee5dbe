"""Dream Trainer: a PyTorch-native trainer from one device to many (DDP, FSDP2, TP, CP, PP)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names resolved on first use, so `import dream_trainer.configs` stays light.
_LAZY: dict[str, str] = {
    "DreamTrainer": "dream_trainer.trainer",
    "BaseTrainer": "dream_trainer.trainer",
    "Callback": "dream_trainer.trainer",
    "DreamTrainerConfig": "dream_trainer.configs",
    "DeviceParameters": "dream_trainer.configs",
    "TrainingParameters": "dream_trainer.configs",
    "DistributedWorld": "dream_trainer.world",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dream_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
