"""While ``configure_models`` builds models on the meta device, moving them is a no-op.

Users coming from plain PyTorch write ``self.model = Model().to(self.device)``; the trainer
places every model itself after parallelizing it, so the move is left to it instead of failing
with "Cannot copy out of meta tensor". Dtype conversions still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_DEVICE_MOVES: set[Callable[..., Any]] = {torch.Tensor.cuda, torch.Tensor.cpu}
for _name in ("xpu", "mps", "ipu", "hpu"):
    if hasattr(torch.Tensor, _name):
        _DEVICE_MOVES.add(getattr(torch.Tensor, _name))


class MovesStayOnMeta(TorchFunctionMode):
    """Turns ``meta_tensor.to(device)`` (and ``.cuda()``, ``.cpu()``) into staying on meta."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and source.is_meta:
            if func in _DEVICE_MOVES:
                return source
            if func is torch.Tensor.to:
                device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
                if device is not None and torch.device(device).type != "meta":
                    if dtype is None and memory_format is None:
                        return source
                    return func(
                        source, dtype=dtype, memory_format=memory_format or torch.preserve_format
                    )
        return func(*args, **kwargs)
