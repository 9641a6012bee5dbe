"""``torch.compile`` for parallelized modules, with the input guard tensor parallelism needs.

Tensor-parallel styles redistribute with ``async_op=True``, so a module running eagerly (an
embedding, a norm left uncompiled) can hand the next module an ``AsyncCollectiveTensor``. When
that module is compiled, torch (seen on 2.13) loses the autograd edge of such an input: the
backward either reaches the collective with a plain tensor and fails (``'Tensor' object has no
attribute '_local_tensor'``), or, under FSDP, silently drops the gradient of everything before it
(the token embedding of a tensor-parallel transformer trained with zero gradient). Waiting for
the collective in eager code, before the compiled region starts, keeps the edge.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["compile_module", "guard_compiled_inputs"]

_GUARDED = "_dream_trainer_guarded"


def _async_collective_type() -> type | None:
    module = sys.modules.get("torch.distributed._functional_collectives")
    return getattr(module, "AsyncCollectiveTensor", None)


class _WaitCollective(torch.autograd.Function):
    """Identity that waits for a pending collective; gradients pass straight through."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        done = tensor.trigger_wait()  # type: ignore[attr-defined]
        # A fresh tensor object, so autograd's metadata is not written into the collective's.
        return done.view_as(done)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _resolved(value: Any, pending: type) -> Any:
    if isinstance(value, pending):
        return _WaitCollective.apply(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, pending) for v in value):
        items = [_resolved(v, pending) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _resolved(v, pending) for k, v in value.items()}
    return value


def _waiting_call(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        pending = _async_collective_type()
        if pending is not None:
            args = tuple(_resolved(a, pending) for a in args)
            if kwargs:
                kwargs = {k: _resolved(v, pending) for k, v in kwargs.items()}
        return compiled(*args, **kwargs)

    setattr(call, _GUARDED, True)
    return call


def guard_compiled_inputs(module: nn.Module) -> int:
    """Make every compiled module in ``module``'s tree wait for pending collectives on entry.

    Covers modules compiled in place (``module.compile()``) and ``torch.compile`` wrappers
    (``OptimizedModule``). Idempotent; returns how many modules were guarded by this call.
    """
    guarded = 0
    for sub in module.modules():
        compiled = getattr(sub, "_compiled_call_impl", None)
        if compiled is not None and not getattr(compiled, _GUARDED, False):
            sub._compiled_call_impl = _waiting_call(compiled)
            guarded += 1
        elif _is_optimized_module(sub) and not getattr(sub.forward, _GUARDED, False):
            sub.forward = _waiting_call(sub.forward)
            guarded += 1
    return guarded


def compile_module(module: nn.Module, **options: Any) -> nn.Module:
    """Compile ``module`` in place (parameter names unchanged) with the input guard.

    ``options`` go to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ...).
    Returns ``module``.
    """
    module.compile(**options)
    if getattr(module, "_compiled_call_impl", None) is None:  # pragma: no cover - torch layout
        raise RuntimeError(
            f"torch {torch.__version__} compiled {type(module).__name__} in a way Dream Trainer "
            "cannot guard against lost gradients under tensor parallelism; set "
            "compile_model=False or use torch 2.11-2.15"
        )
    guard_compiled_inputs(module)
    return module


def _is_optimized_module(module: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return optimized is not None and isinstance(module, optimized)
