"""Which device a rank computes on, and which process-group backend goes with it."""

from __future__ import annotations

import torch
import torch.distributed as dist


def pick_device(local_rank: int, requested: str | torch.device | None = None) -> torch.device:
    """The device this rank computes on: the requested one, else its accelerator, else the CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator()
        if kind is not None and kind.type != "cpu":
            return torch.device(kind.type, local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA, torch's default backend for any other accelerator."""
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        return "nccl"
    backend = dist.Backend.default_device_backend_map.get(device.type)
    if backend is None:
        raise RuntimeError(
            f"torch.distributed has no default backend for device type {device.type!r}; "
            "pass device='cpu' or install the backend package for this accelerator"
        )
    return str(backend)
