"""Total gradient norm over parameters spread across DTensor meshes, and clipping by it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


def _sharded_dims(tensor: DTensor) -> tuple[int, ...]:
    # Dims where ranks hold different pieces; Replicate dims hold copies and must be counted once.
    return tuple(i for i, p in enumerate(tensor.placements) if not isinstance(p, Replicate))


@torch.no_grad()
def total_grad_norm(
    parameters: Iterable[torch.Tensor],
    norm_type: float = 2.0,
    extra_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """The norm of all gradients as if every parameter were one full tensor on one device.

    Sharded DTensor dims are reduced across their ranks; replicated dims are counted once.
    ``extra_mesh`` (e.g. the pipeline mesh) sums contributions of ranks holding different
    parameters. Returns a scalar tensor without synchronizing with the host.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    groups: dict[tuple[DeviceMesh | None, tuple[int, ...]], list[torch.Tensor]] = {}
    device: torch.device | None = None
    for grad in grads:
        key: tuple[DeviceMesh | None, tuple[int, ...]] = (None, ())
        local = grad
        if isinstance(grad, DTensor):
            key = (grad.device_mesh, _sharded_dims(grad))
            local = grad.to_local()
        device = device or local.device
        groups.setdefault(key, []).append(local)
    if device is None:
        device = torch.device("cpu")
    total = torch.zeros((), device=device, dtype=torch.float32)
    for (mesh, dims), locals_ in groups.items():
        norms = torch._foreach_norm(locals_, norm_type)
        stacked = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
        if norm_type == math.inf:
            part = stacked.max()
            op = dist.ReduceOp.MAX
        else:
            part = stacked.pow(2).sum()
            op = dist.ReduceOp.SUM
        if mesh is not None:
            for dim in dims:
                dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        total = torch.maximum(total, part) if norm_type == math.inf else total + part
    if extra_mesh is not None and extra_mesh.size() > 1:
        op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=extra_mesh.get_group())
    return total if norm_type == math.inf else total.sqrt()


@torch.no_grad()
def clip_grads_by_total_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor
) -> None:
    """Scale gradients in place so their total norm is at most ``max_norm`` (no host sync)."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    scale_grads_(parameters, coef)


@torch.no_grad()
def scale_grads_(parameters: Iterable[torch.Tensor], factor: torch.Tensor | float) -> None:
    """Multiply every gradient (local shards of DTensors) by ``factor``."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_device.setdefault(local.device, []).append(local)
    for device, locals_ in by_device.items():
        value = factor.to(device) if isinstance(factor, torch.Tensor) else factor
        torch._foreach_mul_(locals_, value)
