"""Finding the objects a configure hook assigned to the trainer, without patching any class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def assigned_during(owner: Any, keep: Callable[[Any], bool]) -> Iterator[dict[str, Any]]:
    """Collect attributes of ``owner`` that were added or rebound inside the block.

    Only values for which ``keep`` is true are collected, in assignment order.
    """
    before = {name: id(value) for name, value in vars(owner).items()}
    found: dict[str, Any] = {}
    yield found
    for name, value in vars(owner).items():
        if before.get(name) != id(value) and keep(value):
            found[name] = value
