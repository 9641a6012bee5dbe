"""The seam where an inference backend plugs in: anything that maps a batch to its results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class InferenceEngine(Protocol):
    """A backend serving one replica (our model, or e.g. a vLLM engine a replica starts).

    ``infer`` gets a batch of items and returns one result per item, in order. It runs on every
    rank of the replica (a TP group calls it together); the replica's lowest rank hands in the
    results. A backend that keeps its own GPUs per process (vLLM with its own tensor
    parallelism) is one replica per process: run it under a world of plain data parallelism.
    """

    def infer(self, batch: list[Any]) -> Sequence[Any]: ...


def as_batch_function(
    fn: Callable[[list[Any]], Sequence[Any]] | InferenceEngine,
) -> Callable[[list[Any]], Sequence[Any]]:
    """The batch function of an engine, or ``fn`` itself."""
    if isinstance(fn, InferenceEngine):
        return fn.infer
    if not callable(fn):
        raise TypeError(
            f"expected a function batch -> results or an InferenceEngine (an object with an "
            f"infer(batch) method), got {type(fn).__name__}"
        )
    return fn
