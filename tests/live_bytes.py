"""Count the bytes of tensors allocated while a block runs, and how many are still alive.

CPU tensors have no allocator statistics (``torch.cuda.max_memory_allocated`` is CUDA only),
so :class:`LiveBytes` watches every op through a ``TorchDispatchMode``: a storage that an op
returns and none of its inputs had is new; a weak reference on it subtracts its bytes when
torch frees it. DTensor ops are counted through their local tensors. Meta tensors are skipped.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(value: Any) -> torch.UntypedStorage | None:
    if isinstance(value, DTensor):
        value = value._local_tensor
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return None
    return value.untyped_storage()


class LiveBytes(TorchDispatchMode):
    """``live``: bytes allocated inside the block and not freed yet; ``peak``: their maximum;
    ``largest``: the biggest single allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._alive: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {s._cdata for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for storage in map(_storage, tree_leaves(out)):
            if storage is None or storage._cdata in given or storage._cdata in self._alive:
                continue
            size = storage.nbytes()
            self._alive[storage._cdata] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, size)
            weakref.finalize(storage, self._free, storage._cdata)
        return out
