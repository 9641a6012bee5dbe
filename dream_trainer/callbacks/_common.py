"""Helpers shared by the callbacks: argument checks, step bookkeeping, clean-up at teardown."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("dream_trainer.callbacks")


def check_int(owner: str, name: str, value: Any, minimum: int, fix: str) -> int:
    """``value`` if it is an int >= ``minimum``; else an error naming the argument and a fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}({name}={value!r}): {name} must be an integer, got {type(value).__name__}; "
            f"{fix}"
        )
    if value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be >= {minimum}; {fix}")
    return value


def check_float(owner: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be a finite number")
    return float(value)


def completes_step(trainer: Any) -> bool:
    """In ``pre/post_train_step``: whether this micro-batch is the last of its optimizer step."""
    return not trainer.is_accumulating_gradients


def is_global_zero(trainer: Any) -> bool:
    world = trainer.world
    return not hasattr(world, "environment") or world.is_global_zero


_CLEANUPS = "_dream_trainer_callback_cleanups"


def run_at_teardown(trainer: Any, key: str, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` once when ``trainer`` tears down, whether ``fit()`` ends or fails.

    Callbacks have no hook for a failed run (``post_fit`` runs only after a normal end and
    ``on_interrupt`` only on Ctrl-C), so this wraps this trainer instance's ``teardown`` until
    it has run; the class is untouched. ``cleanup`` must be idempotent: a callback may also
    call it from ``post_fit``. Registering ``key`` again replaces the earlier function.
    """
    cleanups: dict[str, Callable[[], None]] | None = trainer.__dict__.get(_CLEANUPS)
    if cleanups is None:
        cleanups = {}
        setattr(trainer, _CLEANUPS, cleanups)
        original = trainer.teardown  # the class's bound method

        def teardown() -> None:
            try:
                original()
            finally:
                del trainer.__dict__["teardown"]
                pending = list(trainer.__dict__.pop(_CLEANUPS).values())
                _run_all(pending)

        trainer.teardown = teardown
    cleanups[key] = cleanup


def _run_all(cleanups: list[Callable[[], None]]) -> None:
    """Run every clean-up even if one fails; then raise the first failure."""
    first: BaseException | None = None
    for cleanup in cleanups:
        try:
            cleanup()
        except BaseException as error:
            if first is None:
                first = error
            else:
                logger.exception("another callback clean-up failed as well")
    if first is not None:
        raise first
