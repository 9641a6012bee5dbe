"""The automatic layout: which degrees a model needs, from the world and the device memory.

:func:`choose_layout` is the decision, a pure function of the numbers. It estimates what each
device holds, compares it with the budget ``device memory x (1 - activation_reserve)`` (less
the activations, when given) and takes the first layout that fits, in this order: one device
(world size 1), DDP, HSDP over nodes, FSDP over all ranks, then for the smallest tensor-parallel
degree (within a node) that fits: HSDP x TP over nodes, else FSDP x TP. The estimate per device, for ``P`` parameters of which ``T`` are trainable:

* model states ``S = P x bytes + T x (bytes + optimizer bytes)`` (weights, gradients, state);
* DDP holds ``S`` (plus a ``param_dtype`` copy of the weights when that dtype differs);
* FSDP over ``d`` ranks holds ``S / d`` plus two gathered units (the one running and the one
  prefetched), each the largest block in the compute dtype, divided by the TP degree.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from dream_trainer.configs import AutoLayout, DeviceParameters

logger = logging.getLogger("dream_trainer.world")


@dataclass(frozen=True)
class ModelSize:
    """What the layout needs to know about the models (all of them together)."""

    parameters: int
    trainable: int
    bytes_per_parameter: float = 4.0
    """Bytes of a stored parameter; its gradient has the same size."""
    largest_block: int = 0
    """Parameters of the largest unit FSDP gathers at once; 0: not counted."""
    tensor_parallel: bool = True
    """The models can be split by tensor parallelism (they have a plan)."""


@dataclass(frozen=True)
class LayoutChoice:
    """The chosen degrees, and why."""

    device_parameters: DeviceParameters
    """The input parameters with the degrees filled in and ``auto_layout`` removed."""
    kind: str
    """``"single device"``, ``"DDP"``, ``"HSDP"``, ``"FSDP"``, ``"FSDP x TP"`` or ``"TP"``."""
    reason: str
    fits: bool
    """False only on one rank, where there is no other choice and the estimate is too large."""
    per_device_bytes: int
    budget_bytes: int

    def describe(self) -> str:
        """The line rank 0 logs: ``auto layout: FSDP (dp_shard=4): model states ...``."""
        chosen = {
            name: value
            for name, value in self.device_parameters.degrees().items()
            if value != 1 and name in ("dp_replicate", "dp_shard", "tensor_parallel")
        }
        degrees = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "every degree 1"
        return f"auto layout: {self.kind} ({degrees}): {self.reason}"


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        count /= 1024
        if count < 1024 or unit == "PiB":
            break
    return f"{count:.1f} {unit}"


def format_count(count: int) -> str:
    """``8_030_000_000`` -> ``"8.03B"``; exact below a thousand."""
    for size, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def choose_layout(
    device_parameters: DeviceParameters,
    world_size: int,
    devices_per_node: int,
    device_memory_bytes: int,
    model: ModelSize,
) -> LayoutChoice:
    """Choose the degrees for ``device_parameters`` (an ``auto`` layout; its options and
    ``param_dtype`` are read) on ``world_size`` ranks, ``devices_per_node`` to a node.

    Raises ValueError naming the numbers and the fixes when no layout fits.
    """
    options = device_parameters.auto_layout or AutoLayout()
    if world_size < 1 or devices_per_node < 1 or world_size % devices_per_node:
        raise ValueError(
            f"the automatic layout needs the same number of ranks on every node, but the world "
            f"has {world_size} ranks and {devices_per_node} per node (the launcher's "
            "LOCAL_WORLD_SIZE). Launch the same number of ranks on each node, or give the "
            "degrees yourself instead of 'auto'."
        )
    e = _Estimate(device_parameters, options, device_memory_bytes, model)
    nodes = world_size // devices_per_node

    def chosen(
        kind: str, degrees: dict[str, int], reason: str, need: float, t: int = 1
    ) -> LayoutChoice:
        params = device_parameters.model_dump()
        params.update(dp_replicate=1, dp_shard=1, tensor_parallel=1, auto_layout=None)
        params.update(degrees)
        sharded = kind not in ("single device", "DDP")
        return LayoutChoice(
            type(device_parameters).model_validate(params),
            kind,
            reason + e.budget_note(t, sharded),
            fits=need <= e.budget(t),
            per_device_bytes=math.ceil(need),
            budget_bytes=math.floor(e.budget(t)),
        )

    full, one = e.replicated(), e.budget(1)
    states = f"model states {format_bytes(e.states)} ({e.describe_states()})"
    if world_size == 1:
        verb = "fit" if full <= one else "do not fit"
        return chosen("single device", {}, f"one rank: {states} {verb} {e.budget_text(1)}", full)
    if full <= one:
        reason = (
            f"{states} fit {e.budget_text(1)}, so each of the {world_size} ranks holds a replica"
        )
        return chosen("DDP", {"dp_replicate": world_size}, reason, full)
    reason = f"{states} do not fit {e.budget_text(1)}"
    node_share = e.sharded(devices_per_node, 1)
    if nodes > 1 and devices_per_node > 1:
        if node_share <= one:
            reason += (
                f"; a node's share, {e.sharded_text(devices_per_node, 1)}, does, so each of the "
                f"{nodes} nodes holds a replica sharded over its {devices_per_node} ranks"
            )
            degrees = {"dp_replicate": nodes, "dp_shard": devices_per_node}
            return chosen("HSDP", degrees, reason, node_share)
        reason += f", nor does a node's share ({format_bytes(node_share)})"
    sharded = e.sharded(world_size, 1)
    if sharded <= one:
        reason += f"; sharded over all {world_size} ranks: {e.sharded_text(world_size, 1)}"
        return chosen("FSDP", {"dp_shard": world_size}, reason, sharded)
    reason += f"; sharded over all {world_size} ranks: {e.sharded_text(world_size, 1)}, too much"
    allowed = model.tensor_parallel and options.allow_tensor_parallel
    degrees_tp = [t for t in range(2, devices_per_node + 1) if devices_per_node % t == 0]
    for t in degrees_tp if allowed else []:
        node_need = e.sharded(devices_per_node, t)
        if nodes > 1 and node_need <= e.budget(t):
            # As HSDP above: all-gathers stay inside a node, only gradients cross nodes.
            shard = devices_per_node // t
            reason += (
                f"; tensor parallelism of degree {t} within a node divides the gathered blocks"
                f"{' and activations' if e.activations else ''} by {t}, and then a node's share "
                f"fits: {e.sharded_text(devices_per_node, t)} of {e.budget_text(t, short=True)}, "
                f"so each of the {nodes} nodes holds a replica "
                + (f"sharded over {shard} data-parallel ranks x " if shard > 1 else "over ")
                + f"{t} tensor-parallel ranks"
            )
            degrees = {"dp_replicate": nodes, "dp_shard": shard, "tensor_parallel": t}
            kind = "HSDP x TP" if shard > 1 else "DDP x TP"
            return chosen(kind, degrees, reason, node_need, t)
        need = e.sharded(world_size, t)
        if need <= e.budget(t):
            reason += (
                f"; tensor parallelism of degree {t} within a node divides the gathered blocks"
                f"{' and activations' if e.activations else ''} by {t}: "
                f"{e.sharded_text(world_size, t)} of {e.budget_text(t, short=True)}"
            )
            degrees = {"dp_shard": world_size // t, "tensor_parallel": t}
            return chosen("FSDP x TP" if world_size > t else "TP", degrees, reason, need, t)
    raise ValueError(_nothing_fits(e, reason, world_size, devices_per_node, allowed, degrees_tp))


class _Estimate:
    """Bytes per device of each kind of layout, for one model and device."""

    def __init__(
        self, params: DeviceParameters, options: AutoLayout, memory: int, model: ModelSize
    ) -> None:
        self.options, self.memory, self.model = options, memory, model
        b, o = model.bytes_per_parameter, options.optimizer_bytes_per_parameter
        self.weights = model.parameters * b
        self.states = self.weights + model.trainable * (b + o)
        self.compute = params.param_dtype.itemsize if params.param_dtype is not None else b
        # A param_dtype copy of the full weights, when it differs from the stored dtype.
        self.cast_copy = model.parameters * self.compute if self.compute != b else 0.0
        self.gathered = 2 * model.largest_block * self.compute
        self.activations = float(options.activation_memory or 0)

    def describe_states(self) -> str:
        m, o = self.model, self.options.optimizer_bytes_per_parameter
        b = m.bytes_per_parameter
        return (
            f"{format_count(m.parameters)} parameters x {b:g} bytes + "
            f"{format_count(m.trainable)} trainable x ({b:g} + {o:g}) bytes of gradient and "
            "optimizer state"
        )

    def budget(self, t: int) -> float:
        return self.memory * (1 - self.options.activation_reserve) - self.activations / t

    def budget_text(self, t: int, short: bool = False) -> str:
        text = f"a {format_bytes(self.budget(t))} budget"
        return text if short else "one device's " + text.removeprefix("a ")

    def budget_note(self, t: int, sharded: bool = True) -> str:
        note = (
            f" (budget: {format_bytes(self.memory)} of device memory x (1 - activation_reserve "
            f"{self.options.activation_reserve:g})"
        )
        if self.activations:
            note += f" - activations {format_bytes(self.activations)}" + (
                f" / {t}" if t > 1 else ""
            )
        if sharded and not self.model.largest_block:
            note += "; gathered blocks not counted: largest_block_parameters not given"
        return note + ")"

    def replicated(self) -> float:
        return self.states + self.cast_copy

    def sharded(self, shards: int, t: int) -> float:
        return self.states / shards + self.gathered / t

    def sharded_text(self, shards: int, t: int) -> str:
        text = f"{format_bytes(self.states / shards)} per device"
        if self.gathered:
            text += f" + {format_bytes(self.gathered / t)} of gathered blocks"
            text += f" = {format_bytes(self.sharded(shards, t))}"
        return text


def _nothing_fits(
    e: _Estimate, reason: str, world: int, per_node: int, allowed: bool, tp: list[int]
) -> str:
    t = max(tp) if allowed and tp else 1
    room = e.budget(t) - e.gathered / t
    if room > 0:
        ranks = per_node * math.ceil(e.states / room / per_node)  # whole nodes
        more = f"launch at least {ranks} ranks"
        if t > 1:
            more += f" (with tensor parallelism {t})"
    else:
        more = "no number of ranks helps: the gathered blocks and activations alone exceed it"
    if not allowed:
        tp_note = "; tensor parallelism was not considered (" + (
            "allow_tensor_parallel=False)"
            if not e.options.allow_tensor_parallel
            else "the model has no tensor-parallel plan)"
        )
    elif not tp:
        tp_note = f"; no tensor-parallel degree divides the {per_node} devices per node"
    else:
        tp_note = (
            f"; with tensor parallelism {t} (the most within a node): {e.sharded_text(world, t)}"
        )
    return (
        f"auto layout: nothing fits on {world} ranks: {reason}{tp_note}{e.budget_note(t)}. "
        f"Fixes: {more}; use devices with more memory (or give the true device_memory); store "
        "fewer bytes per parameter (a model built in bfloat16, an optimizer with less state; "
        "bytes_per_parameter and optimizer_bytes_per_parameter to match); lower activation_reserve or activation_memory "
        "(checkpoint_activations=True); or give the degrees yourself (e.g. with cpu_offload=True)."
    )


def model_size_from(options: AutoLayout, measure: Callable[[], ModelSize] | None) -> ModelSize:
    """The counts given in ``options``, else ``measure()`` with the given fields replacing it."""
    if options.parameter_count is not None:
        total = options.parameter_count
        trainable = options.trainable_count
        return ModelSize(
            parameters=total,
            trainable=total if trainable is None else trainable,
            bytes_per_parameter=options.bytes_per_parameter or 4.0,
            largest_block=options.largest_block_parameters or 0,
        )
    if measure is None:
        raise RuntimeError(
            "the automatic layout needs the models' parameter count: a trainer counts it by "
            "building its models on the meta device; without a trainer give it, e.g. "
            "DeviceParameters.auto(parameter_count=8_000_000_000)"
        )
    measured = measure()
    given: dict[str, Any] = {}
    if options.trainable_count is not None:
        given["trainable"] = options.trainable_count
    if options.bytes_per_parameter is not None:
        given["bytes_per_parameter"] = options.bytes_per_parameter
    if options.largest_block_parameters is not None:
        given["largest_block"] = options.largest_block_parameters
    return replace(measured, **given)


def device_memory_bytes(device: torch.device, ranks_on_node: int) -> int:
    """Memory of ``device``: an accelerator's total memory, or on the CPU the physical RAM
    divided by the ``ranks_on_node`` that share it."""
    if device.type == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            ram = 0
        if ram <= 0:
            raise RuntimeError(
                "cannot read this machine's physical memory for the automatic layout; give it, "
                "e.g. DeviceParameters.auto(device_memory='64GiB')"
            )
        return int(ram // max(1, ranks_on_node))
    module = getattr(torch, device.type, None)
    properties = getattr(module, "get_device_properties", None)
    total = getattr(properties(device), "total_memory", None) if properties else None
    if not total:
        raise RuntimeError(
            f"cannot read the memory of {device} for the automatic layout; give it, e.g. "
            "DeviceParameters.auto(device_memory='80GiB')"
        )
    return int(total)


def check_ranks_agree(choice: LayoutChoice, memory: int, group: Any) -> None:
    """Raise on every rank unless all ranks chose the same degrees (they build one mesh)."""
    mine = (tuple(choice.device_parameters.degrees().values()), memory)
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if len({degrees for degrees, _ in every}) == 1:
        return
    ranks = "; ".join(
        f"rank {r}: degrees {degrees}, device memory {format_bytes(m)}"
        for r, (degrees, m) in enumerate(every)
    )
    raise RuntimeError(
        f"the automatic layout chose different degrees on different ranks ({ranks}), usually "
        "because their devices have different memory; give the same device_memory on every "
        "rank, e.g. DeviceParameters.auto(device_memory='80GiB'), or the degrees yourself"
    )
