"""Caches that outlive a world: DTensor's sharding plans and torch.compile's graphs.

Both name process groups. A second world in the same process (a second ``fit``) builds new
groups, so the world clears them when it launches and when it is destroyed.
"""

from __future__ import annotations

import sys

import torch


def clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding and redistribution plans.

    They are keyed by mesh *value*, so after process groups are destroyed and meshes rebuilt
    with the same shape (a second ``fit`` in one process), a cached plan would name dead groups.
    """
    from torch.distributed.tensor import DTensor, _redistribute

    propagator = DTensor._op_dispatcher.sharding_propagator
    for name in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        clear = getattr(getattr(propagator, name, None), "cache_clear", None)
        if clear is not None:
            clear()
    native_clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native_clear is not None:
        native_clear()
    transform_clear = getattr(
        getattr(_redistribute, "_gen_transform_infos", None), "cache_clear", None
    )
    if transform_clear is not None:
        transform_clear()
    planner_clear = getattr(_redistribute, "clear_redistribute_planner_cache", None)
    if planner_clear is not None:
        planner_clear()


def forget_compiled_graphs() -> None:
    """Drop torch.compile's cached graphs, which name the process groups of their collectives.

    A second world in the same process builds new groups under new names; a graph cached by
    the first would call collectives on groups that no longer exist ("Could not resolve the
    process group registered under the name ..."), since dynamo's guards do not check them.
    """
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
