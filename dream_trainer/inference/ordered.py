"""Run a function over items on every data-parallel replica; results come back in input order."""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from dream_trainer.inference.engine import InferenceEngine, as_batch_function
from dream_trainer.inference.replicas import Replicas
from dream_trainer.inference.split import batches_of, split_indices
from dream_trainer.world import DistributedWorld

logger = logging.getLogger("dream_trainer.inference")

Gather = Literal["rank0", "all"]
OnError = Literal["raise", "rerun_on_remaining", "rerun_on_one"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "rerun_on_remaining", "rerun_on_one")


@dataclass
class FailedShare:
    """Items one replica could not process, and why."""

    replica: int
    rank: int
    """The rank where the error was raised."""
    ranks: tuple[int, ...]
    """Every rank of the replica."""
    indices: list[int]
    """Input positions of the failed items (empty: a padding batch failed)."""
    error: str
    """The exception, formatted (last frames of the traceback)."""
    keys: list[Any] = field(default_factory=list)
    """Primary keys of the failed items, where the items have keys (JSONL streaming)."""

    def describe(self) -> str:
        where = f"rank {self.rank}"
        if len(self.ranks) > 1:
            where += f" of replica {self.replica} (ranks {list(self.ranks)})"
        else:
            where += f" (replica {self.replica})"
        if self.keys:
            what = f"keys {_abbreviate(self.keys)}"
        elif self.indices:
            what = f"items {_abbreviate(self.indices)}"
        else:
            what = "a padding batch"
        return f"{where} failed on {what}: {self.error.strip()}"


class InferenceError(RuntimeError):
    """One or more replicas failed; raised on every rank, naming each failed rank and its items."""

    def __init__(self, failures: list[FailedShare], hint: str) -> None:
        self.failures = failures
        lines = [f"inference failed on {len(failures)} share(s):"]
        lines += [f"  - {f.describe()}" for f in failures]
        lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass
class _Outcome:
    results: dict[int, Any]
    """Input position -> result (on the ranks that gather)."""
    failures: list[FailedShare]
    """Every replica's failures (on every rank)."""
    per_replica: list[int]
    """Results received from each replica."""


def _abbreviate(values: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _format_error(error: BaseException) -> str:
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    text = "".join(frames[-3:])
    return text if len(text) < 2000 else text[-2000:]


def to_host(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (detached), so it can be sent and kept."""
    if isinstance(value, torch.Tensor):
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            raise TypeError(
                "a result holds a DTensor; call .full_tensor() on it inside the function (on "
                "every rank of the replica) so that a plain tensor is returned"
            )
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_host(v) for v in value]
    if isinstance(value, tuple):
        items = [to_host(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def replicas_for(world: DistributedWorld | None, lockstep: bool | None) -> Replicas:
    """The replicas of ``world``, or of the default process group; ``lockstep`` overrides."""
    if world is not None:
        replicas = Replicas.of_world(world)
    else:
        replicas = Replicas.of_process_group()
    if lockstep is not None and lockstep != replicas.lockstep:
        replicas = dataclasses.replace(replicas, lockstep=lockstep)
    return replicas


def check_options(batch_size: int, gather: str, on_error: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if gather not in ("rank0", "all"):
        raise ValueError(f"gather must be 'rank0' or 'all', got {gather!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")


def agree_on_count(replicas: Replicas, n_items: int, log_ready: bool) -> None:
    """Check that every rank was given the same number of items (and that every rank is up)."""
    if replicas.group is None:
        return
    counts: list[Any] = [None] * replicas.world_size
    dist.all_gather_object(counts, n_items, group=replicas.group)
    if len(set(counts)) != 1:
        by_count: dict[int, list[int]] = {}
        for rank, count in enumerate(counts):
            by_count.setdefault(count, []).append(rank)
        described = "; ".join(f"{c} on ranks {r}" for c, r in sorted(by_count.items()))
        raise ValueError(
            f"every rank must pass the same items (the split is computed on each rank), but the "
            f"item counts differ: {described}. Build the item list identically on every rank "
            "(e.g. read the same file), not from rank-dependent data."
        )
    if log_ready and replicas.rank == 0:
        for replica in range(replicas.count):
            logger.info("worker %s (replica %d) is ready", replicas.describe(replica), replica)


def run_assignment(
    call: Callable[[list[Any]], Sequence[Any]],
    items: Sequence[Any],
    assignment: list[list[int]],
    replicas: Replicas,
    batch_size: int,
    gather: Gather,
) -> _Outcome:
    """Each replica runs its assigned positions in batches; results gathered by position."""
    mine = assignment[replicas.index]
    batches = batches_of(mine, batch_size)
    rounds = len(batches)
    if replicas.lockstep:
        rounds = max((len(a) + batch_size - 1) // batch_size for a in assignment)
    padding = next((a[0] for a in assignment if a), None)
    results: dict[int, Any] = {}
    failures: list[FailedShare] = []
    ranks = replicas.ranks[replicas.index]
    for round_index in range(rounds):
        batch = batches[round_index] if round_index < len(batches) else None
        positions = batch if batch is not None else []
        if replicas.lockstep:  # full batches everywhere, so that fn's collectives line up
            positions = positions + [padding] * (batch_size - len(positions))  # type: ignore[list-item]
        try:
            outputs = call([items[i] for i in positions])  # type: ignore[index]
            if not isinstance(outputs, Sequence) or isinstance(outputs, (str, bytes)):
                raise TypeError(
                    f"the function must return a sequence with one result per item, got "
                    f"{type(outputs).__name__}"
                )
            if len(outputs) != len(positions):
                raise ValueError(
                    f"the function returned {len(outputs)} results for a batch of "
                    f"{len(positions)} items; return exactly one result per item, in order"
                )
            if batch is not None and replicas.is_leader:  # padding results are dropped
                for position, output in zip(batch, outputs):
                    results[position] = to_host(output)
        except Exception as error:
            failure = FailedShare(
                replicas.index, replicas.rank, ranks, list(batch or []), _format_error(error)
            )
            if not replicas.independent:
                # Peers may be inside a collective with this rank (TP, PP, FSDP): carrying on
                # would hang them. Fail now; the launcher ends the other ranks.
                raise InferenceError([failure], _dependent_hint(replicas)) from error
            failures.append(failure)  # reported with the rank and its items after the exchange
    return _exchange(results, failures, replicas, gather)


def _exchange(
    results: dict[int, Any], failures: list[FailedShare], replicas: Replicas, gather: Gather
) -> _Outcome:
    if replicas.group is None:
        return _Outcome(results, failures, [len(results)])
    group, size = replicas.group, replicas.world_size
    all_failures: list[Any] = [None] * size
    dist.all_gather_object(all_failures, failures, group=group)
    merged_failures = [f for rank_failures in all_failures for f in rank_failures]
    payload = results if replicas.is_leader else None
    received: list[Any] | None
    if gather == "all":
        received = [None] * size
        dist.all_gather_object(received, payload, group=group)
    else:
        received = [None] * size if replicas.rank == 0 else None
        dist.gather_object(payload, received, dst=0, group=group)
    merged: dict[int, Any] = {}
    per_replica = [0] * replicas.count
    if received is not None:
        leader_of = {ranks[0]: index for index, ranks in enumerate(replicas.ranks)}
        for rank, part in enumerate(received):
            if part is None:
                continue
            per_replica[leader_of[rank]] += len(part)
            merged.update(part)
    return _Outcome(merged, merged_failures, per_replica)


def run_with_fallback(
    call: Callable[[list[Any]], Sequence[Any]],
    items: Sequence[Any],
    positions: list[int],
    replicas: Replicas,
    batch_size: int,
    gather: Gather,
    on_error: OnError,
    keys: Sequence[Any] | None = None,
    log_assignment: bool = True,
) -> tuple[_Outcome, list[FailedShare]]:
    """Run ``positions`` split evenly over the replicas; rerun failed shares as ``on_error`` says.

    Returns the outcome (results of everything that succeeded) and the failures that remain.
    """
    assignment = split_indices(positions, replicas.count)
    if log_assignment:
        total = sum(len(a) for a in assignment)
        log_shares([len(a) for a in assignment], replicas, f"{total} items in all")
    outcome = run_assignment(call, items, assignment, replicas, batch_size, gather)
    failures = outcome.failures
    if failures and on_error != "raise":
        failed_replicas = {f.replica for f in failures}
        healthy = [r for r in range(replicas.count) if r not in failed_replicas]
        rerun = sorted({i for f in failures for i in f.indices})
        if healthy and rerun and all(f.indices for f in failures):  # no failed padding batch
            targets = healthy if on_error == "rerun_on_remaining" else healthy[:1]
            if replicas.rank == 0:
                logger.warning(
                    "rerunning %d failed items on %s (on_error=%r):\n%s",
                    len(rerun),
                    ", ".join(f"replica {r} ({replicas.describe(r)})" for r in targets),
                    on_error,
                    "\n".join(f"  - {f.describe()}" for f in failures),
                )
            second: list[list[int]] = [[] for _ in range(replicas.count)]
            for target, share in zip(targets, split_indices(rerun, len(targets))):
                second[target] = share
            retry = run_assignment(call, items, second, replicas, batch_size, gather)
            outcome.results.update(retry.results)
            outcome.per_replica = [a + b for a, b in zip(outcome.per_replica, retry.per_replica)]
            failures = retry.failures
    if keys is not None:
        for failure in failures:
            failure.keys = [keys[i] for i in failure.indices]
    return outcome, failures


def log_shares(shares: list[int], replicas: Replicas, total: str) -> None:
    """Rank 0 logs each replica's item count; a rank whose replica has none says so itself."""
    if replicas.rank == 0:
        for replica, count in enumerate(shares):
            logger.info(
                "assigned %d items to replica %d (%s)", count, replica, replicas.describe(replica)
            )
    if shares[replicas.index] == 0:
        logger.info(
            "rank %d has 0 items (replica %d of %d; %s)",
            replicas.rank,
            replicas.index,
            replicas.count,
            total,
        )


def _dependent_hint(replicas: Replicas) -> str:
    why = "runs in lockstep" if replicas.lockstep else "spans several ranks"
    return (
        f"Each replica {why} (its forward has collectives), so a failed rank stops the job "
        "instead of waiting for a rerun; fix the cause and run again (with JSONL streaming, "
        "resume=True continues after the records already written)."
    )


def _failure_hint(on_error: str) -> str:
    if on_error == "raise":
        return (
            "Fix the cause and run again, or pass on_error='rerun_on_remaining' (rerun the "
            "failed items on the replicas that did not fail) or 'rerun_on_one' (on one replica)."
        )
    return "The rerun failed too (or no replica was left to rerun on); fix the cause and run again."


def distributed_map(
    fn: Callable[[list[Any]], Sequence[Any]] | InferenceEngine,
    items: Sequence[Any],
    *,
    batch_size: int = 1,
    world: DistributedWorld | None = None,
    gather: Gather = "rank0",
    lockstep: bool | None = None,
    on_error: OnError = "raise",
) -> list[Any] | None:
    """``fn`` over ``items`` on every data-parallel replica; every result once, in input order.

    Every rank passes the same ``items``. They are cut into one contiguous, as-even-as-possible
    share per replica (33 on 4 replicas: 9, 8, 8, 8); each replica calls ``fn`` on batches of
    up to ``batch_size`` items of its share (``fn(batch) -> one result per item``, or an
    :class:`InferenceEngine`). Results may be any picklable values (tensors come back on the
    CPU). Returns the list on rank 0 (``gather="rank0"``, ``None`` elsewhere) or on every rank
    (``"all"``).

    ``world``: the replicas are its data-parallel ranks (a TP group or a PP pipeline is one
    replica); ``None``: every rank of the default process group, or this process alone.
    ``lockstep``: every rank makes as many ``fn`` calls, each with exactly ``batch_size`` items
    (filled up with a padding item whose results are dropped), because the model's forward has
    collectives across replicas; the default is the world's (FSDP's ``dp_shard > 1``), else off. ``on_error``: ``"raise"`` an
    :class:`InferenceError` naming each failed rank and its items; ``"rerun_on_remaining"`` /
    ``"rerun_on_one"``: rerun the failed shares once on the replicas that did not fail. Only
    independent replicas (one rank each, no lockstep) can carry on after a failure; otherwise the
    failing rank raises at once, since its peers may be waiting in a collective with it.
    """
    check_options(batch_size, gather, on_error)
    call = as_batch_function(fn)
    items = items if isinstance(items, Sequence) else list(items)
    replicas = replicas_for(world, lockstep)
    agree_on_count(replicas, len(items), log_ready=True)
    if replicas.rank == 0:
        logger.info(
            "starting %d data-parallel workers (%d ranks) for %d items, batch size %d",
            replicas.count,
            replicas.world_size,
            len(items),
            batch_size,
        )
    outcome, failures = run_with_fallback(
        call, items, list(range(len(items))), replicas, batch_size, gather, on_error
    )
    if failures:
        raise InferenceError(failures, _failure_hint(on_error))
    if replicas.rank == 0:
        for replica, count in enumerate(outcome.per_replica):
            logger.info(
                "received %d results from replica %d (%s)",
                count,
                replica,
                replicas.describe(replica),
            )
    if gather == "rank0" and replicas.rank != 0:
        return None
    missing = [i for i in range(len(items)) if i not in outcome.results]
    if missing:  # a bug here, not the user's: every position has exactly one owner
        raise RuntimeError(f"results missing for items {_abbreviate(missing)}")
    return [outcome.results[i] for i in range(len(items))]
