"""Callbacks: code that runs at named points of the trainer's life, kept out of the trainer."""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

TrainerT = TypeVar("TrainerT")

HOOKS = (
    "pre_launch",
    "post_launch",
    "pre_configure",
    "post_configure",
    "pre_setup",
    "post_setup",
    "pre_fit",
    "post_fit",
    "pre_epoch",
    "post_epoch",
    "pre_train_step",
    "post_train_step",
    "pre_optimizer_step",
    "post_optimizer_step",
    "pre_optimizer_zero_grad",
    "post_optimizer_zero_grad",
    "pre_validation_epoch",
    "post_validation_epoch",
    "pre_validation_step",
    "post_validation_step",
    "on_interrupt",
)
"""Every hook a callback may implement."""


class Callback(Generic[TrainerT]):
    """Base class of callbacks. Override the hooks you need; each receives only event data.

    Declare what the callback needs from the trainer with the type parameter, a trainer
    mixin or a runtime-checkable protocol: ``class LogLR(Callback[LoggerMixin])``. Attaching
    it to a trainer without that capability fails at once, naming what is missing.
    ``self.trainer`` is set when the callback is attached.
    """

    trainer: TrainerT

    @classmethod
    def required_trainer_types(cls) -> tuple[type, ...]:
        """The trainer capabilities named in the class's ``Callback[...]`` base."""
        found: list[type] = []
        for klass in cls.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                if typing.get_origin(base) is Callback:
                    for arg in typing.get_args(base):
                        # Any and type variables state no requirement.
                        if isinstance(arg, type) and arg is not Any:
                            found.append(arg)
        return tuple(found)

    def attach(self, trainer: Any) -> None:
        """Bind to ``trainer`` after checking it has what this callback needs."""
        for required in self.required_trainer_types():
            if not isinstance(trainer, required):
                raise TypeError(
                    f"{type(self).__name__} needs a trainer that is a {required.__name__}, but "
                    f"{type(trainer).__name__} is not; add {required.__name__} to its bases or "
                    "remove this callback"
                )
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """State to save with a checkpoint; empty by default."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # Hooks (no-ops by default).
    def pre_launch(self) -> None: ...
    def post_launch(self) -> None: ...
    def pre_configure(self) -> None: ...
    def post_configure(self) -> None: ...
    def pre_setup(self) -> None: ...
    def post_setup(self) -> None: ...
    def pre_fit(self) -> None: ...
    def post_fit(self) -> None: ...
    def pre_epoch(self) -> None: ...
    def post_epoch(self) -> None: ...
    def pre_train_step(self, batch: Any, batch_idx: int) -> None: ...
    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None: ...
    def pre_optimizer_step(self, optimizer: Any) -> None: ...
    def post_optimizer_step(self, optimizer: Any) -> None: ...
    def pre_optimizer_zero_grad(self, optimizer: Any) -> None: ...
    def post_optimizer_zero_grad(self, optimizer: Any) -> None: ...
    def pre_validation_epoch(self) -> None: ...
    def post_validation_epoch(self, results: dict[str, float]) -> None: ...
    def pre_validation_step(self, batch: Any, batch_idx: int) -> None: ...
    def post_validation_step(self, result: dict[str, Any], batch_idx: int) -> None: ...
    def on_interrupt(self) -> None: ...


def _implements(callback: Callback[Any], hook: str) -> bool:
    return hook in vars(callback) or getattr(type(callback), hook) is not getattr(Callback, hook)


def _nothing(*args: Any) -> None:
    return None


def _dispatcher(listeners: list[Any]) -> Any:
    if not listeners:
        return _nothing
    if len(listeners) == 1:
        return listeners[0]

    def dispatch(*args: Any) -> None:
        for listener in listeners:
            listener(*args)

    return dispatch


class CallbackCollection:
    """An ordered list of callbacks; calling a hook on it calls it on each, in order."""

    def __init__(self, callbacks: Iterable[Callback[Any]] = ()) -> None:
        self._callbacks: list[Callback[Any]] = []
        for callback in callbacks:
            self.append(callback)

    def append(self, callback: Callback[Any]) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be dream_trainer Callback instances, got {type(callback).__name__}"
            )
        self._callbacks.append(callback)
        for hook in HOOKS:  # dispatchers cached by __getattr__ are rebuilt on next use
            self.__dict__.pop(hook, None)

    def attach(self, trainer: Any) -> None:
        for callback in self._callbacks:
            callback.attach(trainer)

    def __iter__(self) -> Iterator[Callback[Any]]:
        return iter(self._callbacks)

    def __len__(self) -> int:
        return len(self._callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self._callbacks:
            getattr(callback, hook)(*args)

    def __getattr__(self, hook: str) -> Any:
        # Runs once per hook: the dispatcher is cached as an instance attribute. It calls only
        # the callbacks that implement the hook (the base class's are no-ops), so a hook fired
        # per micro-batch costs one call when nothing listens to it.
        if hook not in HOOKS:
            raise AttributeError(hook)
        listeners = [getattr(c, hook) for c in self._callbacks if _implements(c, hook)]
        dispatch = _dispatcher(listeners)
        self.__dict__[hook] = dispatch
        return dispatch

    def keys(self) -> list[str]:
        """Stable names: the class name, with ``#i`` added when a class appears more than once."""
        totals = Counter(type(c).__qualname__ for c in self._callbacks)
        seen: Counter[str] = Counter()
        names = []
        for callback in self._callbacks:
            name = type(callback).__qualname__
            names.append(f"{name}#{seen[name]}" if totals[name] > 1 else name)
            seen[name] += 1
        return names

    def state_dict(self) -> dict[str, Any]:
        return {key: c.state_dict() for key, c in zip(self.keys(), self._callbacks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, callback in zip(self.keys(), self._callbacks):
            if key in state_dict:
                callback.load_state_dict(state_dict[key])
