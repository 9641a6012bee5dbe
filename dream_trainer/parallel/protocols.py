"""How a model declares its parallel layout: the ``FullyShard`` and ``ParallelPlan`` protocols.

A module opts in by defining the method (no base class needed), or by naming the protocol as
a base, as the parallelism guide does (``class Block(nn.Module, FullyShard)``). The appliers
in :mod:`dream_trainer.parallel` walk the module tree and call these methods.
"""

from __future__ import annotations

import abc
import sys
from typing import Any

from torch import nn

__all__ = [
    "FullyShard",
    "ParallelPlan",
    "has_parallel_plan",
    "implements_fully_shard",
    "unwrap_compiled",
]

PLAN_METHODS = ("parallelize_plan", "parallel_plan")
"""Accepted names of the plan method: fsdp2-utils' and the parallelism guide's."""


def _defines(cls: type, name: str) -> bool:
    # Look on the class: OptimizedModule forwards attribute access to the wrapped module,
    # and a submodule or parameter of that name must not count as an implementation.
    return callable(getattr(cls, name, None))


class FullyShard(abc.ABC):  # noqa: B024 - a protocol with a default, not an abstract class
    """A module that knows how to apply FSDP2 to itself.

    ``config`` holds keyword arguments for ``fully_shard``: ``mesh``, ``mp_policy`` and
    ``offload_policy`` (``reshard_after_forward`` may be added per call). Any class defining
    ``fully_shard(self, config)`` is a ``FullyShard``; a class that names ``FullyShard`` as a
    base without defining the method is sharded as one unit.
    """

    def fully_shard(self, config: dict[str, Any]) -> None:
        from dream_trainer.parallel.fully_shard import fully_shard

        if not isinstance(self, nn.Module):
            raise TypeError(
                f"{type(self).__name__} declares FullyShard but is not an nn.Module, so it cannot "
                "be sharded; define fully_shard(self, config) or mix FullyShard into a module"
            )
        fully_shard(self, **config)

    @classmethod
    def __subclasshook__(cls, klass: type) -> bool:
        if cls is FullyShard and _defines(klass, "fully_shard"):
            return True
        return NotImplemented


class ParallelPlan(abc.ABC):  # noqa: B024 - a structural protocol, not an abstract class
    """A module that declares its tensor-parallel plan.

    It defines ``parallelize_plan(self, loss_parallel)`` or, as the parallelism guide names
    it, ``parallel_plan(self, loss_parallel)``. The plan is a dict, or a tuple of dicts applied
    in order, mapping names relative to the module (``""`` is the module itself; dotted
    submodule paths; ``*`` wildcards per path segment; names of bare ``nn.Parameter``
    attributes) to style constructors such as ``colwise_parallel()``.
    """

    @classmethod
    def __subclasshook__(cls, klass: type) -> bool:
        if cls is ParallelPlan and any(_defines(klass, name) for name in PLAN_METHODS):
            return True
        return NotImplemented


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """Return the module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module``."""
    # If dynamo was never imported, nothing can be an OptimizedModule; avoid importing it.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized_cls = getattr(eval_frame, "OptimizedModule", None)
    while optimized_cls is not None and isinstance(module, optimized_cls):
        module = module._orig_mod
    return module


def implements_fully_shard(module: nn.Module) -> bool:
    """True when ``module`` (not a compile wrapper around it) defines or inherits ``fully_shard``."""
    return _defines(type(module), "fully_shard")


def has_parallel_plan(module: nn.Module) -> bool:
    """True when ``module`` defines a plan method or names ``ParallelPlan`` as a base."""
    return isinstance(module, ParallelPlan)


def plan_method(module: nn.Module) -> Any:
    """The bound plan method of ``module``, under either accepted name."""
    found = [name for name in PLAN_METHODS if _defines(type(module), name)]
    name = type(module).__name__
    if not found:
        raise TypeError(
            f"{name} declares ParallelPlan but defines neither parallel_plan(self, loss_parallel) "
            "nor parallelize_plan(self, loss_parallel); define one of them returning its plan"
        )
    if len(found) > 1:
        raise TypeError(
            f"{name} defines both parallelize_plan and parallel_plan; they are two names for the "
            "same method, so keep only one"
        )
    return getattr(module, found[0])
