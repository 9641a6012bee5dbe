"""Iterating loaders so every rank runs the same number of batches, and telling samplers the epoch."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dream_trainer.world import DistributedWorld

logger = logging.getLogger("dream_trainer.trainer")


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's sampler (or batch sampler) which epoch starts, for reshuffling."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def agreed_batches(
    loader: Iterable[Any],
    limit: int | None,
    world: DistributedWorld,
    multiple_of: int,
    what: str,
    skip: int = 0,
    progress: dict[str, int | None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, batch)`` for a count every rank agrees on, so none waits in a collective.

    The count is a multiple of ``multiple_of`` (whole accumulation groups only). With
    ``len(loader)`` the ranks agree once on the smallest length; otherwise they read one group
    at a time and agree that every rank has a whole group before yielding it. ``skip`` is how
    many of ``len(loader)`` a loader restored mid-epoch will not yield again. ``progress``, if
    given, receives ``total``: the agreed count, or ``None`` when the loader has no length.
    """
    if progress is not None:
        progress["total"] = None
    group = world.cpu_group if world.world_size > 1 else None
    try:
        local = len(loader) - skip  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # e.g. a DataLoader over an IterableDataset
        local = None
    if local is not None:
        if limit is not None:
            local = min(local, limit)
        lengths = [local]
        if group is not None:
            gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(world.world_size)]
            dist.all_gather(gathered, torch.tensor([local]), group=group)
            lengths = [int(t.item()) for t in gathered]
        smallest = min(lengths)
        total = smallest // multiple_of * multiple_of
        if total == 0 and local > 0 and what == "training":
            raise RuntimeError(
                f"the {what} dataloader yields {smallest} batches on the smallest "
                f"rank, fewer than gradient_accumulation_steps={multiple_of}; make batches "
                "smaller or lower gradient_accumulation_steps"
            )
        _warn_about_uneven_shares(what, lengths, total, world.rank)
        if progress is not None:
            progress["total"] = total
        iterator = iter(loader)
        for index in range(total):
            yield index, next(iterator)
        return
    iterator = iter(loader)
    index = 0
    while limit is None or index + multiple_of <= limit:
        pending = []
        for _ in range(multiple_of):
            batch = next(iterator, _END)
            if batch is _END:
                break
            pending.append(batch)
        flag = torch.tensor([1 if len(pending) == multiple_of else 0])
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            if pending:
                logger.warning(
                    "the %s dataloader ran out inside an accumulation group; dropping %d "
                    "micro-batches so no partial group reaches the optimizer",
                    what,
                    len(pending),
                )
            return
        for batch in pending:
            yield index, batch
            index += 1


_END = object()


def _warn_about_uneven_shares(what: str, lengths: list[int], used: int, rank: int) -> None:
    """Say (once, from rank 0) when ranks have no batches or some drop batches to stay in step."""
    if rank != 0:
        return
    empty = [r for r, n in enumerate(lengths) if n == 0]
    if empty:
        logger.warning(
            "the %s dataloader yields 0 batches on rank(s) %s (batches per rank: %s), so %s "
            "runs no steps; give every data-parallel rank at least one batch (a larger dataset, "
            "smaller batches or fewer ranks)",
            what,
            empty,
            lengths,
            what,
        )
    elif min(lengths) == max(lengths) > used:
        logger.warning(
            "the %s dataloader yields %d batches per rank; the last %d do not fill a whole "
            "accumulation group and are skipped this pass",
            what,
            lengths[0],
            lengths[0] - used,
        )
    elif max(lengths) > used:
        dropped = {r: n - used for r, n in enumerate(lengths) if n > used}
        logger.warning(
            "the %s dataloader yields different numbers of batches per rank (%s); every rank "
            "runs %d so none waits in a collective, dropping %s batches (rank: count) this pass",
            what,
            lengths,
            used,
            dropped,
        )
