"""Checkpoint directories: written under a temporary name, committed by rename plus a marker.

``{run}/checkpoints/step_00000120/`` holds the DCP files of every rank, ``trainer.json`` (the
run's counters and layout), ``rank_{r}.json`` (per-rank RNG and data state) and, last of all,
``COMPLETE.json``. A checkpoint without the marker (a crash mid-save) is never resumed from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointInfo", "commit", "complete_checkpoints", "prune", "step_dir"]

COMPLETE = "COMPLETE.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    time: float
    metrics: dict[str, float]


def step_dir(root: Path, step: int, partial: bool = False) -> Path:
    """``root/step_{step}`` (or its temporary ``.step_{step}.partial`` name while written)."""
    name = f"step_{step:08d}"
    return root / (f".{name}.partial" if partial else name)


def commit(partial: Path, final: Path, step: int, metrics: dict[str, float]) -> None:
    """Rename the fully written ``partial`` to ``final`` and mark it complete."""
    if final.exists():  # the same step saved again (end of fit right after a periodic save)
        shutil.rmtree(final)
    os.replace(partial, final)
    record = {"step": step, "time": time.time(), "metrics": metrics}
    tmp = final / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, final / COMPLETE)
    _sync_directory(final.parent)


def _sync_directory(path: Path) -> None:
    # Make the renames durable before the checkpoint is reported as written.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[CheckpointInfo]:
    """The complete checkpoints under ``root`` (one run's, or ``*/checkpoints`` of an
    experiment), oldest first."""
    found = []
    runs = [run for run in sorted(root.glob("*/checkpoints")) if not run.parent.is_symlink()]
    markers = sorted(root.glob(f"step_*/{COMPLETE}"))
    for run in runs:  # not through the experiment's `latest` link: each checkpoint once
        markers += sorted(run.glob(f"step_*/{COMPLETE}"))
    for marker in markers:
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            info = CheckpointInfo(
                marker.parent, int(record["step"]), float(record["time"]), record["metrics"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a marker being written right now, or damaged: not complete
        found.append(info)
    return sorted(found, key=lambda c: (c.time, c.step))


def prune(
    root: Path,
    keep_last: int | None,
    keep_best: int | None,
    monitor: str | None,
    mode: str,
    keep: Path | None = None,
) -> list[Path]:
    """Delete complete checkpoints outside the newest ``keep_last`` and the best ``keep_best``,
    and partial ones other than ``keep``; returns what was deleted."""
    deleted: list[Path] = []
    for partial in root.glob(".step_*.partial"):
        if partial != keep:
            shutil.rmtree(partial, ignore_errors=True)
            deleted.append(partial)
    if keep_last is None and keep_best is None:
        return deleted
    checkpoints = [c for c in complete_checkpoints(root) if c.path.parent == root]
    kept = set()
    if keep_last is not None:
        kept |= {c.path for c in checkpoints[-keep_last:]}
    if keep_best is not None and monitor is not None:
        scored = [(c.metrics.get(monitor), c) for c in checkpoints]
        ranked = [(v, c) for v, c in scored if isinstance(v, (int, float)) and not math.isnan(v)]
        ranked.sort(key=lambda vc: vc[0], reverse=mode == "max")
        kept |= {c.path for _, c in ranked[:keep_best]}
    for checkpoint in checkpoints:
        if checkpoint.path not in kept:
            # The marker goes first, so a half-deleted checkpoint is never taken for complete.
            (checkpoint.path / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            deleted.append(checkpoint.path)
    return deleted


def describe(info: CheckpointInfo) -> dict[str, Any]:
    return {"path": str(info.path), "step": info.step, "metrics": info.metrics}
