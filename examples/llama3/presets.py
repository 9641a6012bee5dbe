"""Run presets by name: the model shape plus training settings that suit it."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from dream_trainer.configs import DeviceParameters, TrainingParameters

ConfigT = TypeVar("ConfigT", bound=BaseModel)

PRESETS = ("debug", "1B", "3B", "8B", "70B", "405B")

SHARDED_INIT_PRESETS = ("70B", "405B")
"""Presets initialized shard by shard (``weight_init="sharded"``): a full fp32 copy per rank
would take 280 GB (70B) or 1.6 TB (405B) of host memory."""


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def preset(name: str, config_class: type[ConfigT]) -> ConfigT:
    """The named preset as ``config_class``. ``debug`` trains on 2 CPU ranks in minutes."""
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; choose one of: {', '.join(PRESETS)}")
    gpu = _on_gpu()
    # bf16 compute with fp32 reduction on GPUs; fp32 on CPU, where bf16 matmuls are slow.
    precision: dict[str, Any] = (
        {"param_dtype": "bfloat16", "reduce_dtype": "float32"} if gpu else {}
    )
    if name == "debug":
        return config_class(
            project="llama3",
            experiment="debug",
            model="debug",
            seq_len=128,
            batch_size=8,
            lr=3e-3,
            warmup_steps=10,
            device_parameters=DeviceParameters.FSDP(**precision),
            training_parameters=TrainingParameters(
                n_epochs=1, max_steps=120, val_every_n_steps=40, val_steps_per_epoch=4
            ),
            logging_parameters={"log_every_n_steps": 10},
        )
    return config_class(
        project="llama3",
        experiment=name,
        model=name,
        seq_len=2048 if name == "1B" else 8192,
        batch_size=4 if name == "1B" else 1,
        lr=3e-4,
        warmup_steps=100,
        # The model's init is layout-invariant, so both give the same weights (see model.py).
        weight_init="sharded" if name in SHARDED_INIT_PRESETS else "full",
        device_parameters=DeviceParameters.FSDP(compile_model=gpu, **precision),
        training_parameters=TrainingParameters(
            n_epochs=1,
            max_steps=1000,
            val_every_n_steps=250,
            val_steps_per_epoch=8,
            gradient_clip_val=1.0,
        ),
        logging_parameters={"log_every_n_steps": 10},
    )
