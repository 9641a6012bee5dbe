"""Total gradient norm over parameters spread across DTensor meshes, and clipping by it.

Both run on every optimizer step, so they avoid per-parameter Python work: a DTensor's local
shard is read directly (``to_local()`` runs an autograd function per call), gradients are
grouped once per call, and each group costs one ``_foreach_norm`` and a handful of ops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

_GroupKey = tuple[DeviceMesh | None, tuple[int, ...], torch.device]


def _sharded_dims(tensor: DTensor) -> tuple[int, ...]:
    # Dims where ranks hold different pieces; Replicate dims hold copies and must be counted once.
    return tuple(i for i, p in enumerate(tensor.placements) if not isinstance(p, Replicate))


def _local(tensor: DTensor) -> torch.Tensor:
    # The shard itself, without to_local()'s autograd function (these are gradients, under
    # no_grad); to_local() where a torch version lacks the attribute.
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor.to_local()


def _grouped_grads(parameters: Iterable[torch.Tensor]) -> dict[_GroupKey, list[torch.Tensor]]:
    """Local gradients by (mesh, sharded mesh dims, device): each group reduces alike."""
    groups: dict[_GroupKey, list[torch.Tensor]] = {}
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            local = _local(grad)
            key: _GroupKey = (grad.device_mesh, _sharded_dims(grad), local.device)
        else:
            local = grad
            key = (None, (), grad.device)
        group = groups.get(key)
        if group is None:
            groups[key] = [local]
        else:
            group.append(local)
    return groups


@torch.no_grad()
def total_grad_norm(
    parameters: Iterable[torch.Tensor],
    norm_type: float = 2.0,
    extra_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """The norm of all gradients as if every parameter were one full tensor on one device.

    Sharded DTensor dims are reduced across their ranks; replicated dims are counted once.
    ``extra_mesh`` (e.g. the pipeline mesh) sums contributions of ranks holding different
    parameters. Returns a float32 scalar tensor without synchronizing with the host.
    """
    return _norm_of_groups(_grouped_grads(parameters), norm_type, extra_mesh)


@torch.no_grad()
def clip_grads_and_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float | None,
    extra_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """:func:`total_grad_norm` (2-norm), then, with ``max_norm``, the clipping of
    :func:`clip_grads_by_total_norm_`; the gradients are gathered once for both."""
    groups = _grouped_grads(parameters)
    norm = _norm_of_groups(groups, 2.0, extra_mesh)
    if max_norm is not None:
        coef = _clip_coefficient(max_norm, norm)
        for (_, _, device), locals_ in groups.items():
            _multiply_(locals_, device, coef)
    return norm


def _norm_of_groups(
    groups: dict[_GroupKey, list[torch.Tensor]],
    norm_type: float = 2.0,
    extra_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """The total norm of gradients grouped by :func:`_grouped_grads`."""
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    inf = norm_type == math.inf
    reduce_across = extra_mesh is not None and extra_mesh.size() > 1
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    if len(groups) == 1 and not reduce_across:
        (mesh, dims, _), locals_ = next(iter(groups.items()))
        if mesh is None or not dims:  # nothing to reduce: one norm of the per-tensor norms
            norms = torch.stack(torch._foreach_norm(locals_, norm_type)).float()
            return torch.linalg.vector_norm(norms, norm_type)
    device = next(iter(groups))[2] if groups else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (mesh, dims, _), locals_ in groups.items():
        norms = torch.stack(torch._foreach_norm(locals_, norm_type)).float()
        part = norms.max() if inf else norms.pow(2).sum()
        if mesh is not None:
            for dim in dims:
                dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        part = part.to(device)
        total = torch.maximum(total, part) if inf else total + part
    if reduce_across:
        assert extra_mesh is not None
        dist.all_reduce(total, op=op, group=extra_mesh.get_group())
    return total if inf else total.sqrt()


@torch.no_grad()
def clip_grads_by_total_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor
) -> None:
    """Scale gradients in place so their total norm is at most ``max_norm`` (no host sync)."""
    scale_grads_(parameters, _clip_coefficient(max_norm, total_norm))


def _clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def scale_grads_(parameters: Iterable[torch.Tensor], factor: torch.Tensor | float) -> None:
    """Multiply every gradient (local shards of DTensors) by ``factor``."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        local = _local(grad) if isinstance(grad, DTensor) else grad
        group = by_device.get(local.device)
        if group is None:
            by_device[local.device] = [local]
        else:
            group.append(local)
    for device, locals_ in by_device.items():
        _multiply_(locals_, device, factor)


def _multiply_(
    tensors: list[torch.Tensor], device: torch.device, factor: torch.Tensor | float
) -> None:
    """``tensors`` (all on ``device``) times ``factor``, moved there first if it is a tensor."""
    if isinstance(factor, torch.Tensor) and factor.device != device:
        factor = factor.to(device)
    torch._foreach_mul_(tensors, factor)
