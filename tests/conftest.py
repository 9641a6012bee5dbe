"""Shared pytest configuration for the Dream Trainer test suite.

Markers:
    multirank: the test starts several CPU ranks through ``tests.multirank`` (slow-ish, spawns
        processes). Deselect with ``-m "not multirank"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Spawned ranks inherit sys.path, so they can import ``tests.*`` modules by qualified name.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import multirank  # noqa: E402  (needs REPO_ROOT on sys.path)

# ----------------------------------------------------------------------------- markers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "multirank: starts several CPU ranks via tests.multirank (spawns processes)"
    )


# ------------------------------------------------------------------------ session hooks


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the persistent rank pools so no rank outlives the session."""
    multirank.shutdown_pools()


# ------------------------------------------------------------------------------ fixtures
