"""The framework's console output, installed when a run starts, never at import."""

from __future__ import annotations

import logging

_FORMAT = "[dream_trainer] %(message)s"


def ensure_console_logging() -> None:
    """Show the framework's INFO lines (layout, metrics) unless the application set up logging.

    Does nothing when the root logger or the ``dream_trainer`` logger already has a handler, or
    when the application chose a level for ``dream_trainer``.
    """
    framework = logging.getLogger("dream_trainer")
    if logging.getLogger().handlers or framework.handlers or framework.level != logging.NOTSET:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    framework.addHandler(handler)
    framework.setLevel(logging.INFO)
