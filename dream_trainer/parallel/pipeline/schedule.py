"""Pipeline schedules: which stages a rank holds, and checks before torch builds the schedule."""

from __future__ import annotations

import logging

import torch

from dream_trainer.configs import PipelineParallelConfig
from dream_trainer.configs.device import V_SHAPED_SCHEDULES

__all__ = ["check_microbatches", "schedule_class", "stage_indices"]

logger = logging.getLogger("dream_trainer.parallel")


def schedule_class(name: str) -> type:
    """torch's schedule class for ``name``, or an error naming this torch's version."""
    from torch.distributed.pipelining import schedules

    try:
        return schedules.get_schedule_class(name)  # type: ignore[no-any-return]
    except ValueError:
        raise ValueError(
            f"pipeline schedule {name!r} is not in torch {torch.__version__}'s "
            "torch.distributed.pipelining; pick another pipeline_parallel_config.schedule or "
            "upgrade torch"
        ) from None


def stage_indices(config: PipelineParallelConfig, pp_rank: int, pp_size: int) -> list[int]:
    """The stage indices rank ``pp_rank`` holds, in the order its schedule expects.

    Looped schedules give rank ``r`` stages ``r, r + p, r + 2p, ...``; V-shaped ones (ZBV,
    DualPipeV) give it ``r`` and ``2p - 1 - r``.
    """
    per_rank = config.resolved_stages_per_rank()
    if config.schedule in V_SHAPED_SCHEDULES:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + i * pp_size for i in range(per_rank)]


def check_microbatches(
    config: PipelineParallelConfig, num_stages: int, pp_size: int, local_batch: int | None
) -> int:
    """The number of microbatches, checked against the schedule and the batch size."""
    n = config.num_microbatches or num_stages
    name = config.schedule
    if name in ("1F1B", "DualPipeV") and n < num_stages:
        raise ValueError(
            f"schedule {name!r} needs at least as many microbatches as stages ({num_stages}), "
            f"but num_microbatches={n}; raise pipeline_parallel_config.num_microbatches"
        )
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n // pp_size)
        if n % rounds:
            raise ValueError(
                f"schedule {name!r} splits num_microbatches={n} into {rounds} equal rounds "
                f"(num_microbatches // pipeline_parallel={pp_size}), so it must be a multiple of "
                f"{rounds}; use e.g. {rounds * pp_size}"
            )
    if n < num_stages:
        bubble = (num_stages - 1) / (n + num_stages - 1)
        logger.warning(
            "pipeline: %d microbatches for %d stages leave each rank idle about %.0f%% of a "
            "step (bubble (p-1)/(m+p-1)); raise num_microbatches to at least %d",
            n,
            num_stages,
            100 * bubble,
            num_stages,
        )
    if local_batch is not None and local_batch % n:
        raise ValueError(
            f"the batch of {local_batch} samples on this rank cannot be split into "
            f"num_microbatches={n} equal microbatches; make the per-rank batch a multiple of "
            f"{n} or change pipeline_parallel_config.num_microbatches"
        )
    return n
