"""How long to train, how to accumulate and clip, when to validate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from dream_trainer.configs.base import ConfigModel


class TrainingParameters(ConfigModel):
    """Loop lengths and optimizer-step options.

    A *step* is one optimizer step; it consumes ``gradient_accumulation_steps`` batches.
    """

    n_epochs: int = Field(default=1, ge=1)
    """Passes over the training data (stops earlier when ``max_steps`` is reached)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Total optimizer steps; ``None`` means ``n_epochs`` decides."""
    train_steps_per_epoch: int | None = Field(default=None, ge=1)
    """Optimizer steps per epoch; ``None`` means as many as the dataloader allows."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Batches whose gradients are summed before each optimizer step. With both batch sizes
    below given, leave it at 1: it is derived (``global / (micro x data-parallel ranks)``)."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Samples per micro-batch on each data-parallel rank; ``None``: derived from
    ``global_batch_size``, or left to the loaders. The trainer's ``batch_sizes`` holds it."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Samples per optimizer step over all ranks: ``micro_batch_size x data-parallel ranks x
    gradient_accumulation_steps``; given, the missing one of those is derived at launch."""
    val_every_n_steps: int | None = Field(default=None, ge=1)
    """Validate every N optimizer steps; ``None`` validates at each epoch end only."""
    val_steps_per_epoch: int | None = Field(default=None, ge=0)
    """Validation batches per validation run; ``None`` means the whole loader, 0 disables."""
    num_sanity_val_steps: int = Field(default=0, ge=0)
    """Validation batches run before training, to catch bugs in ``validation_step`` early."""
    gradient_clip_val: float | None = Field(default=None, gt=0)
    """Clip the total gradient norm (over all parameters and all ranks) to this value."""
    on_non_finite_grad: Literal["error", "skip"] = "error"
    """What a NaN/inf total gradient norm does: raise naming step and rank, or skip the step.

    ``"skip"`` decides on the host before each optimizer step (one device sync per step).
    ``"error"`` on an accelerator checks without a per-step sync: the norms are checked together
    at the next log step, before a checkpoint is written and at the end of ``fit``, so the error
    (naming the first non-finite step) can come up to a log window late, and no checkpoint
    holds weights updated by such a step. On the CPU the check is immediate (no sync to save)."""

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingParameters:
        if (
            self.max_steps is not None
            and self.train_steps_per_epoch is not None
            and self.max_steps > self.n_epochs * self.train_steps_per_epoch
        ):
            raise ValueError(
                f"max_steps={self.max_steps} can never be reached: n_epochs={self.n_epochs} x "
                f"train_steps_per_epoch={self.train_steps_per_epoch} = "
                f"{self.n_epochs * self.train_steps_per_epoch} steps. Raise n_epochs or lower max_steps."
            )
        return self

    @model_validator(mode="after")
    def _check_batch_sizes(self) -> TrainingParameters:
        # The data-parallel degree is known only at launch; what it cannot fix fails now.
        total, micro = self.global_batch_size, self.micro_batch_size
        accumulation = self.gradient_accumulation_steps
        per_rank = (micro or 1) * accumulation
        if total is not None and total % per_rank:
            raise ValueError(
                f"global_batch_size={total} is not a multiple of {_per_rank_text(self)} = "
                f"{per_rank}, so no number of data-parallel ranks gives it; make "
                f"global_batch_size a multiple of {per_rank}"
            )
        return self

    def batch_sizes(self, dp_size: int) -> BatchSizes:
        """The batch sizes on ``dp_size`` data-parallel ranks (see :func:`resolve_batch_sizes`)."""
        return resolve_batch_sizes(
            dp_size, self.micro_batch_size, self.global_batch_size, self.gradient_accumulation_steps
        )


@dataclass(frozen=True)
class BatchSizes:
    """Samples per optimizer step: ``global_batch = per_device x dp x accumulation``."""

    per_device: int | None
    """Samples per micro-batch on each data-parallel rank (``None``: the loaders decide)."""
    dp: int
    """Data-parallel ranks (``world.dp_size``)."""
    accumulation: int
    """Micro-batches per optimizer step."""
    global_batch: int | None
    """Samples per optimizer step over all ranks (``None`` when ``per_device`` is)."""

    def describe(self) -> str:
        """``batch sizes: 4 per device x 2 data-parallel ranks x 2 accumulation steps = 16``."""
        return (
            f"batch sizes: {self.per_device} per device x {self.dp} data-parallel rank"
            f"{'' if self.dp == 1 else 's'} x {self.accumulation} accumulation step"
            f"{'' if self.accumulation == 1 else 's'} = {self.global_batch} global"
        )


def resolve_batch_sizes(
    dp_size: int, micro_batch_size: int | None, global_batch_size: int | None, accumulation: int
) -> BatchSizes:
    """Derive the missing one of ``global = micro x dp x accumulation``.

    Without ``global_batch_size`` it is the product (``None`` without ``micro_batch_size``).
    With it and no ``micro_batch_size``, the micro-batch is derived. With both, the
    accumulation is derived; an ``accumulation`` other than 1 must then equal it. A result
    that does not divide raises ValueError naming the numbers.
    """
    micro, total = micro_batch_size, global_batch_size
    if total is None:
        derived = None if micro is None else micro * dp_size * accumulation
        return BatchSizes(micro, dp_size, accumulation, derived)
    if micro is None:
        split = dp_size * accumulation
        if total % split:
            raise ValueError(
                f"training_parameters.global_batch_size={total} does not split evenly over "
                f"{dp_size} data-parallel ranks x gradient_accumulation_steps={accumulation} = "
                f"{split}; make global_batch_size a multiple of {split}, or change "
                "gradient_accumulation_steps (or the number of ranks)"
            )
        return BatchSizes(total // split, dp_size, accumulation, total)
    step = micro * dp_size
    sizes = f"micro_batch_size={micro} x {dp_size} data-parallel ranks"
    if accumulation != 1 and total != step * accumulation:
        raise ValueError(
            f"training_parameters.global_batch_size={total} is not {sizes} x "
            f"gradient_accumulation_steps={accumulation} = {step * accumulation}; give two of "
            "the three and leave gradient_accumulation_steps at 1 to have it derived"
        )
    if total % step:
        raise ValueError(
            f"training_parameters.global_batch_size={total} is not a multiple of {sizes} = "
            f"{step}, so no whole number of accumulation steps gives it; make "
            f"global_batch_size a multiple of {step}, or change micro_batch_size (or the "
            "number of ranks)"
        )
    return BatchSizes(micro, dp_size, total // step, total)


def _per_rank_text(params: TrainingParameters) -> str:
    if params.micro_batch_size is None:
        return f"gradient_accumulation_steps={params.gradient_accumulation_steps}"
    if params.gradient_accumulation_steps == 1:
        return f"micro_batch_size={params.micro_batch_size}"
    return (
        f"micro_batch_size={params.micro_batch_size} x "
        f"gradient_accumulation_steps={params.gradient_accumulation_steps}"
    )
