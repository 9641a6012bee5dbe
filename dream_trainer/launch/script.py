"""Get the trainer a training script builds, without training: its ``fit()`` is intercepted."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dream_trainer.trainer import BaseTrainer
from dream_trainer.world import DistributedWorld


class _FitCalled(BaseException):
    # A BaseException, so a script's ``except Exception`` around fit() cannot swallow it.
    def __init__(self, trainer: BaseTrainer) -> None:
        super().__init__("fit() intercepted by the planner")
        self.trainer = trainer


def trainer_from_script(script: str | Path, script_args: Sequence[str] = ()) -> BaseTrainer:
    """Run ``script`` as ``python SCRIPT ARGS...`` would, up to its first ``trainer.fit()``,
    and return that trainer; nothing is launched, configured or trained.

    The script runs as ``__main__`` with ``sys.argv = [SCRIPT, *ARGS]`` and its directory first
    on ``sys.path``. A trainer class that overrides ``fit`` must call ``super().fit()``.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(
            f"training script {str(script)!r} is not a file; give the path of the script that "
            "builds a trainer and calls its fit()"
        )
    with _intercepted(), _as_main(path, list(script_args)):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except _FitCalled as caught:
            return caught.trainer
        except SystemExit as exit_:
            if exit_.code in (None, 0):
                raise RuntimeError(_never_called(path)) from None
            raise RuntimeError(
                f"{path} exited with {exit_.code!r} before calling fit() (with arguments "
                f"{list(script_args)}); run `python {path} --help` to check them"
            ) from None
    raise RuntimeError(_never_called(path))


def _never_called(path: Path) -> str:
    return (
        f"{path} finished without calling fit() on a Dream Trainer trainer; the planner needs a "
        "script that builds a trainer and calls trainer.fit() when run as __main__ (or pass "
        "plan_layout a trainer, or a function that returns one)"
    )


@contextmanager
def _intercepted() -> Iterator[None]:
    """``BaseTrainer.fit`` hands its trainer to us; a world launched before that is refused."""

    def fit(self: BaseTrainer) -> None:
        raise _FitCalled(self)

    def launch(self: DistributedWorld) -> Any:
        raise RuntimeError(
            "the script launched a DistributedWorld before calling BaseTrainer.fit(): a trainer "
            "class that overrides fit() must call super().fit() first thing, or the planner "
            "cannot stop it before training starts"
        )

    saved = BaseTrainer.fit, DistributedWorld.launch
    BaseTrainer.fit, DistributedWorld.launch = fit, launch  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseTrainer.fit, DistributedWorld.launch = saved  # type: ignore[method-assign]


@contextmanager
def _as_main(path: Path, args: list[str]) -> Iterator[None]:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
