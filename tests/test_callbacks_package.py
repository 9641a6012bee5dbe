"""dream_trainer.callbacks: a layer above the trainer, with the documented public names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dream_trainer.callbacks as callbacks
from dream_trainer.trainer import Callback

REPO = Path(__file__).resolve().parent.parent


def test_the_package_exports_the_callbacks_each_documented():
    assert sorted(callbacks.__all__) == sorted(
        [
            "EMA",
            "EarlyStopping",
            "GarbageCollection",
            "LearningRateMonitor",
            "NonFiniteGradMonitor",
            "Profiler",
        ]
    )
    page = (REPO / "docs" / "callbacks.md").read_text(encoding="utf-8")
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        assert issubclass(cls, Callback) and cls.__doc__, name
        assert f"## {name}" in page, f"docs/callbacks.md has no section for {name}"


def test_nothing_in_the_trainer_imports_the_callbacks():
    pattern = re.compile(r"^\s*(from|import)\s+dream_trainer\.callbacks", re.MULTILINE)
    below = [REPO / "dream_trainer" / d for d in ("trainer", "parallel", "world", "configs")]
    offenders = [
        str(path.relative_to(REPO))
        for root in below
        for path in root.rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    code = "import sys, dream_trainer.trainer; assert 'dream_trainer.callbacks' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
