"""Runs one model's pipeline stages on this rank through a ``torch.distributed.pipelining`` schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dream_trainer.configs import PipelineParallelConfig
from dream_trainer.parallel.pipeline.schedule import check_microbatches, schedule_class

__all__ = ["PipelineRunner"]

LossFn = Callable[[Any, Any], torch.Tensor]


class PipelineRunner:
    """The schedule of one model: its parts on this rank, and the steps that run them.

    Losses are scaled here, never by the schedule (``scale_grads=False``): the schedule's own
    scaling divides *all* accumulated gradients by the microbatch count at every step, which
    turns gradient accumulation into a moving average.
    """

    def __init__(
        self,
        parts: Sequence[nn.Module],
        stage_indices: Sequence[int],
        num_stages: int,
        config: PipelineParallelConfig,
        pp_mesh: DeviceMesh,
        device: torch.device,
    ) -> None:
        self.parts, self.stage_indices = list(parts), list(stage_indices)
        self.num_stages, self.config = num_stages, config
        self.pp_mesh, self.device = pp_mesh, device
        self.group = pp_mesh.get_group()
        self.has_first_stage = 0 in self.stage_indices
        self.has_last_stage = num_stages - 1 in self.stage_indices
        ranks = dist.get_process_group_ranks(self.group)
        # Looped and V-shaped layouts both put the last stage on pipeline rank 0 or p - 1.
        last_rank = 0 if num_stages > pp_mesh.size() and config.schedule in _V else -1
        self.last_stage_global_rank = ranks[last_rank]
        self.n_microbatches: int | None = None
        self._shapes: list[tuple[int, ...]] | None = None
        self._schedule: Any = None
        self._loss_fn: LossFn | None = None
        self._scale = 1.0

    # ------------------------------------------------------------------ building

    def _build(self, local_batch: int) -> None:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle

        pp = self.pp_mesh.size()
        self.n_microbatches = check_microbatches(self.config, self.num_stages, pp, local_batch)
        cls = schedule_class(self.config.schedule)
        stages = [
            PipelineStage(part, index, self.num_stages, self.device, group=self.group)
            for part, index in zip(self.parts, self.stage_indices)
        ]
        single = issubclass(cls, PipelineScheduleSingle)
        if single and len(stages) != 1:
            raise ValueError(
                f"schedule {self.config.schedule!r} runs one stage per rank but this rank holds "
                f"{len(stages)}; use a multi-stage schedule such as Interleaved1F1B"
            )
        self._schedule = cls(
            stages[0] if single else stages,
            n_microbatches=self.n_microbatches,
            loss_fn=self._scaled_loss,
            scale_grads=False,
        )

    def microbatches(self, local_batch: int) -> int:
        """Microbatches per batch (building the schedule on first use)."""
        if self._schedule is None:
            self._build(local_batch)
        assert self.n_microbatches is not None
        return self.n_microbatches

    def _check_shapes(self, args: tuple[Any, ...]) -> None:
        # Stages size their send/receive buffers from the first batch, so every later batch
        # must have the same shapes.
        shapes = [tuple(a.shape) for a in args]
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(
                f"pipeline inputs of shapes {shapes} differ from the first batch's {self._shapes}; "
                "under pipeline parallelism every batch must have the same shapes (pad "
                "sequences to a fixed length and keep the batch size; drop_last=True)"
            )

    def _scaled_loss(self, output: Any, target: Any) -> torch.Tensor:
        assert self._loss_fn is not None
        return self._loss_fn(output, target) * self._scale

    # ------------------------------------------------------------------- running

    def step(
        self, inputs: Any, target: Any, loss_fn: LossFn, scale: float, backward: bool
    ) -> tuple[torch.Tensor, Any]:
        """One batch through the pipeline; returns (per-microbatch losses stacked, last outputs).

        ``scale`` multiplies each microbatch loss before its backward. The losses are the
        unscaled values, known on every pipeline rank (broadcast from the last stage).
        """
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        n = self.microbatches(_batch_size(args[0]))
        self._check_shapes(args)
        self._loss_fn, self._scale = loss_fn, scale
        scaled: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {}
        if self.has_last_stage and target is not None:
            kwargs["target"] = target
            kwargs["losses"] = scaled
        run = self._schedule.step if backward else self._schedule.eval
        outputs = run(*args, **kwargs) if self.has_first_stage else run(**kwargs)
        losses = torch.zeros(n, device=self.device)
        if scaled:
            losses = torch.stack([_full(x).detach().float().reshape(()) for x in scaled]) / scale
        if target is not None:
            dist.broadcast(losses, src=self.last_stage_global_rank, group=self.group)
        return losses, outputs if self.has_last_stage else None

    def outputs(self, inputs: Any) -> Any:
        """Forward only; the last stage's outputs on every pipeline rank (a tensor).

        A batch smaller than the training batches is padded with copies of its last sample
        (the outputs for them are dropped); other dimensions must match the training batches.
        """
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        batch = _batch_size(args[0])
        self.microbatches(batch)
        full = self._shapes[0][0] if self._shapes else batch
        if batch < full:
            args = tuple(torch.cat([a, a[-1:].expand(full - batch, *a.shape[1:])]) for a in args)
        self._check_shapes(args)
        # The schedule computes a loss on the last stage whenever it has a loss function, so it
        # gets a placeholder target (split into microbatches like the inputs) and no loss.
        self._loss_fn, self._scale = _no_loss, 1.0
        kwargs = {"target": args[0]} if self.has_last_stage else {}
        run = self._schedule.eval
        out = run(*args, **kwargs) if self.has_first_stage else run(**kwargs)
        meta: list[Any] = [None]
        if self.has_last_stage:
            out = _full(out)[:batch].contiguous()
            meta = [(tuple(out.shape), out.dtype)]
        dist.broadcast_object_list(meta, src=self.last_stage_global_rank, group=self.group)
        shape, dtype = meta[0]
        if not self.has_last_stage:
            out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(out, src=self.last_stage_global_rank, group=self.group)
        return out


_V = ("ZBVZeroBubble", "DualPipeV")


def _no_loss(output: Any, target: Any) -> torch.Tensor:
    return torch.zeros((), device=output.device)


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _batch_size(tensor: Any) -> int:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        raise TypeError(
            "pipeline inputs must be tensors (or a tuple of tensors) with the batch on dim 0, "
            f"got {type(tensor).__name__}"
        )
    return int(tensor.shape[0])
