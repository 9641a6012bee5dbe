"""Apply FSDP2 through the :class:`~dream_trainer.parallel.FullyShard` protocol."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from dream_trainer.parallel.protocols import implements_fully_shard, unwrap_compiled

__all__ = ["apply_fully_shard", "post_order"]


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


def apply_fully_shard(
    module: nn.Module, config: dict[str, Any], pp_enabled: bool = False
) -> nn.Module:
    """Call ``fully_shard(config)`` on every submodule implementing it, children first.

    FSDP2 needs children wrapped before their parents so each parent only manages the
    parameters no child claimed. With pipeline parallelism the parameters stay gathered
    between forward and backward of the microbatches (``reshard_after_forward=False``).
    ``config`` itself is never modified; each call receives its own shallow copy.
    Returns ``module`` (the same object, compiled or not).
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"apply_fully_shard expects config to be a dict of fully_shard keyword arguments, "
            f"got {type(config).__name__}; pass e.g. world.fsdp_config."
        )
    for target in list(post_order(module)):
        if implements_fully_shard(target):
            call_config = dict(config)
            if pp_enabled:
                call_config["reshard_after_forward"] = False
            target.fully_shard(call_config)  # type: ignore[operator]
    return module
