"""Protocols a model implements to declare how it is parallelized.

A module opts in by defining the method; no base class is needed. The appliers in
:mod:`dream_trainer.parallel` walk the module tree and call these methods.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, runtime_checkable

from torch import nn

from dream_trainer.parallel.styles import StyleConstructor

__all__ = [
    "FullyShard",
    "ParallelPlan",
    "has_parallel_plan",
    "implements_fully_shard",
    "unwrap_compiled",
]


@runtime_checkable
class FullyShard(Protocol):
    """A module that knows how to apply FSDP2 to itself.

    ``config`` holds keyword arguments for ``torch.distributed.fsdp.fully_shard``
    (``mesh``, ``mp_policy``, ``offload_policy``, ``reshard_after_forward``, ...).
    """

    def fully_shard(self, config: dict[str, Any]) -> None: ...


@runtime_checkable
class ParallelPlan(Protocol):
    """A module that declares its tensor-parallel plan.

    The plan maps names relative to the module (``""`` is the module itself; dotted
    submodule paths; ``*`` wildcards per path segment; names of bare ``nn.Parameter``
    attributes) to style constructors such as ``colwise_parallel()``.
    """

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, StyleConstructor]: ...


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """Return the module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module``."""
    # If dynamo was never imported, nothing can be an OptimizedModule; avoid importing it.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized_cls = getattr(eval_frame, "OptimizedModule", None)
    while optimized_cls is not None and isinstance(module, optimized_cls):
        module = module._orig_mod
    return module


def _defines_method(module: object, name: str) -> bool:
    # Look on the class: OptimizedModule forwards attribute access to the wrapped module,
    # and a submodule or parameter of that name must not count as an implementation.
    return callable(getattr(type(module), name, None))


def implements_fully_shard(module: nn.Module) -> bool:
    """True when ``module`` (not a compile wrapper around it) defines ``fully_shard``."""
    return _defines_method(module, "fully_shard")


def has_parallel_plan(module: nn.Module) -> bool:
    """True when ``module`` (not a compile wrapper around it) defines ``parallelize_plan``."""
    return _defines_method(module, "parallelize_plan")
