"""Checks a world runs as it launches: options that cannot apply, devices left idle."""

from __future__ import annotations

import logging
import shlex
import sys

import torch

from dream_trainer.configs import DeviceParameters
from dream_trainer.world.environment import LaunchEnvironment, visible_accelerators
from dream_trainer.world.layout import MeshLayout

logger = logging.getLogger("dream_trainer.world")


def check_options(
    params: DeviceParameters, layout: MeshLayout, device: torch.device, rank: int
) -> None:
    """Warn about options that do nothing in this layout; raise for ones that cannot apply."""
    if params.loss_parallel and layout.tp == 1 and rank == 0:
        logger.warning(
            "loss_parallel=True has no effect without tensor parallelism (tensor_parallel "
            "is 1): the loss is computed on full logits. Set tensor_parallel > 1 or "
            "loss_parallel=False."
        )
    if params.async_tensor_parallel:
        problems = []
        if layout.tp == 1:
            problems.append("tensor_parallel is 1")
        if not params.compile_model:
            problems.append("compile_model is False")
        if device.type != "cuda":
            problems.append(f"the device is {device.type}, not cuda")
        if problems:
            raise ValueError(
                "async_tensor_parallel=True cannot be applied: "
                + "; ".join(problems)
                + ". Set async_tensor_parallel=False, or use TP > 1 with compile_model=True on CUDA."
            )


def warn_if_devices_sit_idle(
    env: LaunchEnvironment, requested: str | torch.device | None, device: torch.device
) -> None:
    """Warn when one process runs on a machine with several accelerators and chose none."""
    # One process on a machine with several accelerators is usually a plain `python
    # train.py` meant to use them all; a device passed explicitly says one is intended.
    if env.world_size > 1 or requested is not None:
        return
    kind, count = visible_accelerators()
    if count < 2:
        return
    is_script = bool(sys.argv) and sys.argv[0].endswith(".py")
    command = shlex.join(sys.argv) if is_script else "SCRIPT [ARGS...]"
    limit = " or make one visible (CUDA_VISIBLE_DEVICES=0)" if kind == "cuda" else ""
    logger.warning(
        "%d %s devices are visible but this run has 1 process, so it computes on %s alone. "
        "Start one process per device with `dream-trainer run %s` (or `torchrun "
        "--standalone --nproc_per_node=%d %s`); to use one device on purpose, pass it to "
        'the trainer (DreamTrainer(config, device="%s:0"))%s.',
        count,
        kind,
        device,
        command,
        count,
        command,
        kind,
        limit,
    )
