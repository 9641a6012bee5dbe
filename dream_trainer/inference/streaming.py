"""Whole datasets: results streamed to a JSONL file in input order, resumable by primary key."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dream_trainer.inference.engine import InferenceEngine, as_batch_function
from dream_trainer.inference.jsonl_results import JsonlResultFile
from dream_trainer.inference.ordered import (
    InferenceError,
    OnError,
    Replicas,
    _failure_hint,
    agree_on_count,
    check_options,
    log_shares,
    replicas_for,
    run_with_fallback,
)
from dream_trainer.inference.split import split_indices
from dream_trainer.world import DistributedWorld

logger = logging.getLogger("dream_trainer.inference")


@dataclass(frozen=True)
class StreamSummary:
    """What :func:`distributed_map_to_jsonl` did."""

    path: Path
    written: int
    """Records written by this call."""
    skipped: int
    """Items skipped because their key was already in the file (``resume``)."""


def item_keys(items: Sequence[Any], key: str | Callable[[Any], Any]) -> list[Any]:
    """The primary key of every item; a missing or repeated key is an error naming it."""
    keys: list[Any] = []
    first_seen: dict[Any, int] = {}
    for position, item in enumerate(items):
        if callable(key):
            value = key(item)
        elif isinstance(item, dict) and key in item:
            value = item[key]
        else:
            raise ValueError(
                f"item {position} has no primary key {key!r} (got {type(item).__name__}); give "
                f"each item a {key!r} field, or pass key=<function item -> key>"
            )
        if value in first_seen:
            raise ValueError(
                f"primary key {value!r} appears twice (items {first_seen[value]} and {position});"
                " keys must be unique, or resuming could not tell the items apart"
            )
        first_seen[value] = position
        keys.append(value)
    return keys


def _as_record(result: Any, key_field: str, key: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        if key_field in result and result[key_field] != key:
            raise ValueError(
                f"the result for key {key!r} has {key_field}={result[key_field]!r}; a result's "
                "primary key must be its item's (or leave it out and it is added)"
            )
        return {key_field: key, **{k: v for k, v in result.items() if k != key_field}}
    return {key_field: key, "result": result}


def distributed_map_to_jsonl(
    fn: Callable[[list[Any]], Sequence[Any]] | InferenceEngine,
    items: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    key: str | Callable[[Any], Any] = "id",
    resume: bool = False,
    batch_size: int = 1,
    window: int | None = None,
    world: DistributedWorld | None = None,
    lockstep: bool | None = None,
    on_error: OnError = "raise",
    sync: bool = True,
) -> StreamSummary:
    """Like :func:`distributed_map`, for a whole dataset: rank 0 appends results to ``path``.

    Items go in windows of ``window`` items (default: 4 batches per replica), each split
    evenly over the replicas; after a window, its records are appended in input order (one
    JSON object per line, holding the item's primary key, read from ``key``: a field name or
    a function). A result that is a dict becomes the record (the key added); another value is
    stored under ``"result"``. With ``resume=True`` the keys already in the file are skipped,
    so a killed job continues where it stopped; without it an existing non-empty file is an
    error. On an error the finished records of the window are written before raising.
    """
    check_options(batch_size, "rank0", on_error)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of items, got {window!r}")
    call = as_batch_function(fn)
    items = items if isinstance(items, Sequence) else list(items)
    replicas = replicas_for(world, lockstep)
    keys = item_keys(items, key)
    key_field = key if isinstance(key, str) else "id"
    results_file = JsonlResultFile(path, key_field)
    agree_on_count(replicas, len(items), log_ready=True)
    pending = _pending_positions(results_file, keys, resume, replicas)
    skipped = len(items) - len(pending)
    window = window or replicas.count * batch_size * 4
    windows = [pending[i : i + window] for i in range(0, len(pending), window)]
    _log_plan(replicas, len(items), pending, skipped, windows)
    written = 0
    try:
        for chunk in windows:
            outcome, failures = run_with_fallback(
                call, items, chunk, replicas, batch_size, "rank0", on_error, keys, False
            )
            if replicas.rank == 0:
                done = [i for i in chunk if i in outcome.results]
                records = [_as_record(outcome.results[i], key_field, keys[i]) for i in done]
                results_file.append(records, sync=sync)
                written += len(records)
                logger.debug(
                    "wrote %d records; received per replica: %s", len(records), outcome.per_replica
                )
            if failures:
                raise InferenceError(failures, _failure_hint(on_error) + _resume_hint(path))
    finally:
        results_file.close()
    if replicas.rank == 0:
        logger.info("wrote %d records to %s (%d already there)", written, path, skipped)
    return StreamSummary(Path(path), written, skipped)


def _resume_hint(path: str | os.PathLike[str]) -> str:
    return f" Records that succeeded are in {path}; run again with resume=True to do the rest."


def _pending_positions(
    results_file: JsonlResultFile, keys: list[Any], resume: bool, replicas: Replicas
) -> list[int]:
    """Input positions whose key is not in the file yet; rank 0 decides, every rank follows."""
    decided: list[Any] = [None]
    if replicas.rank == 0:
        try:
            if not resume:
                if results_file.path.exists() and results_file.path.stat().st_size > 0:
                    raise FileExistsError(
                        f"{results_file.path} already holds results; pass resume=True to skip "
                        "the keys it has and do the rest, or choose a new output path"
                    )
                decided[0] = list(range(len(keys)))
            else:
                done = set(results_file.recover())
                decided[0] = [i for i, k in enumerate(keys) if k not in done]
        except (OSError, ValueError) as error:
            decided[0] = error
    if replicas.group is not None:
        dist.broadcast_object_list(decided, src=0, group=replicas.group)
    if isinstance(decided[0], BaseException):
        raise decided[0]
    return list(decided[0])


def _log_plan(
    replicas: Replicas, total: int, pending: list[int], skipped: int, windows: list[list[int]]
) -> None:
    shares = [0] * replicas.count
    for chunk in windows:
        for replica, part in enumerate(split_indices(chunk, replicas.count)):
            shares[replica] += len(part)
    if replicas.rank == 0:
        logger.info(
            "starting %d data-parallel workers (%d ranks) for %d items: %d to do, %d already "
            "done, in %d windows",
            replicas.count,
            replicas.world_size,
            total,
            len(pending),
            skipped,
            len(windows),
        )
    log_shares(shares, replicas, f"{len(pending)} items to do")
