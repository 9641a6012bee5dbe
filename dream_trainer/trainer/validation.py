"""validate(): the validation loop, its sample-weighted metrics and their reduction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dream_trainer.trainer.batches import agreed_batches
from dream_trainer.trainer.reduce import (
    as_scalar_tensor,
    infer_batch_size,
    move_to_device,
    weighted_mean_across,
)
from dream_trainer.world.progress import Phase, Progress

if TYPE_CHECKING:
    from dream_trainer.configs import TrainerConfig
    from dream_trainer.trainer.callback import CallbackCollection
    from dream_trainer.trainer.context_batches import ContextParallelBatches
    from dream_trainer.world import DistributedWorld


class Validation:
    """The part of :class:`BaseTrainer` that runs validation."""

    # Provided by BaseTrainer.
    config: TrainerConfig
    world: DistributedWorld
    callbacks: CallbackCollection
    progress: Progress
    global_step: int
    val_dataloader: Iterable[Any] | None
    validation_results: dict[str, float]
    _context_batches: ContextParallelBatches

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def named_models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        raise NotImplementedError

    def collect_validation_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        """Run validation; metrics are averaged over data-parallel ranks, weighted by samples."""
        loader = self.val_dataloader
        if loader is None:
            return {}
        training = self.config.training_parameters
        limit = training.val_steps_per_epoch if max_batches is None else max_batches
        models = self.named_models().values()
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        self.callbacks.pre_validation_epoch()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        self.progress.mark(Phase.VALIDATION, self.global_step)
        for batch_idx, batch in agreed_batches(loader, limit, self.world, 1, "validation"):
            self.progress.mark(Phase.VALIDATION)  # each batch is progress
            batch = move_to_device(batch, self.device)
            with self._context_batches.batch(batch, "validation") as batch:
                self.callbacks.pre_validation_step(batch, batch_idx)
                result = self.validation_step(batch, batch_idx)
            self.callbacks.post_validation_step(result, batch_idx)
            n = infer_batch_size(batch)
            for name, value in result.items():
                scalar = as_scalar_tensor(name, value, self.device) * n
                sums[name] = sums[name] + scalar if name in sums else scalar
            count += n
        self.progress.mark(Phase.VALIDATION_METRICS)
        results = weighted_mean_across(sums, count, self.world.get_mesh("dp_cp"))
        results.update(self.collect_validation_metrics())
        for model, mode in zip(models, modes):
            model.train(mode)
        self.validation_results = results
        self.callbacks.post_validation_epoch(results)
        if log and results:
            self.log_dict(results, self.global_step)
        return results
