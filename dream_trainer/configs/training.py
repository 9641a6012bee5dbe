"""How long to train, how to accumulate and clip, when to validate."""

from __future__ import annotations

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
    """Batches whose gradients are summed before each optimizer step."""
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
