"""FSDP2 for modules and containers, and the :class:`~dream_trainer.parallel.FullyShard` applier."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp import fully_shard as torch_fully_shard

from dream_trainer.parallel.protocols import implements_fully_shard, unwrap_compiled

__all__ = ["apply_fully_shard", "fully_shard", "post_order", "set_reshard_after_forward"]

ROOT_AWARE_RESHARD_DEFAULT = (
    inspect.signature(torch_fully_shard).parameters["reshard_after_forward"].default is None
)
"""Whether this torch's ``fully_shard`` keeps the root unsharded after forward by default."""


def post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Yield every module of the tree once, children before parents, compile wrappers unwrapped."""
    seen: set[int] = set()

    def visit(current: nn.Module) -> Iterator[nn.Module]:
        current = unwrap_compiled(current)
        if id(current) in seen:
            return
        seen.add(id(current))
        for child in current.children():
            yield from visit(child)
        yield current

    yield from visit(module)


def _is_container(module: nn.Module) -> bool:
    # ModuleList, ModuleDict, Sequential-like holders that never run as a unit themselves.
    return isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (
        type(module).forward is nn.Module.forward
    )


def fully_shard(module: nn.Module | list[nn.Module] | None, **kwargs: Any) -> Any:
    """torch's ``fully_shard``, which also accepts a container of modules.

    A module (or a list of modules sharded as one group) goes to
    ``torch.distributed.fsdp.fully_shard`` unchanged. A container that never runs as a unit
    (``nn.ModuleList``, ``nn.ModuleDict``, a module without ``forward``) has each child sharded
    instead (children that are sharded already are left as they are), as
    ``fully_shard(self.layers, **config)`` means in the parallelism guide. ``None`` (a module a
    pipeline stage does not hold) is left alone. Returns what torch returns, or the container.
    """
    if module is None:
        return None
    if isinstance(module, nn.Module) and _is_container(unwrap_compiled(module)):
        for child in unwrap_compiled(module).children():
            if not isinstance(unwrap_compiled(child), FSDPModule):
                fully_shard(child, **kwargs)
        return module
    return torch_fully_shard(module, **kwargs)


def set_reshard_after_forward(module: nn.Module, reshard: bool) -> int:
    """Set ``reshard_after_forward`` on every FSDP module in the tree; returns how many."""
    count = 0
    for sub in post_order(module):
        if isinstance(sub, FSDPModule):
            sub.set_reshard_after_forward(reshard, recurse=False)
            count += 1
    return count


def apply_fully_shard(
    module: nn.Module, config: dict[str, Any], pp_enabled: bool = False
) -> nn.Module:
    """Call ``fully_shard(config)`` on every submodule implementing it, children first.

    FSDP2 needs children wrapped before their parents so each parent only manages the
    parameters no child claimed. ``config`` itself is never modified; each call receives its
    own shallow copy. With pipeline parallelism the parameters stay gathered between the
    forward and backward of the microbatches: every FSDP module of the tree gets
    ``reshard_after_forward=False`` afterwards, whatever the individual calls asked for.
    Returns ``module`` (the same object, compiled or not).
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"apply_fully_shard expects config to be a dict of fully_shard keyword arguments, "
            f"got {type(config).__name__}; pass e.g. world.fsdp_config."
        )
    for target in list(post_order(module)):
        if implements_fully_shard(target):
            target.fully_shard(dict(config))  # type: ignore[operator]
    if pp_enabled:
        set_reshard_after_forward(module, False)
    return module
