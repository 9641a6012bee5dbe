"""An optimizer's state dict, keyed by parameter name, without changing the optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """torch's ``get_optimizer_state_dict``, leaving an optimizer that has not stepped as it was.

    For a fresh optimizer torch builds the state by stepping it once with zero gradients, which
    starts Adam's step count early: a run that saved (or read) state before its first step
    would then train differently from one that did not.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    fresh = not optimizer.state
    state = get_optimizer_state_dict(model, optimizer)
    if fresh:
        optimizer.state.clear()
    return state
