"""One ``training_step`` for every layout: forward, loss and backward, through a pipeline or not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dream_trainer.configs import TrainerConfig
    from dream_trainer.parallel.pipeline import PipelineRunner

LossFn = Callable[[Any, Any], torch.Tensor]


class ForwardBackward:
    """``forward_backward``, ``forward_loss`` and ``forward_outputs``.

    Without pipeline parallelism they call the model and the loss directly. Under it they run
    the model's stages through its schedule, split the batch into microbatches, and return the
    loss on every rank (it is computed on the last stage). ``inputs`` is a tensor or a tuple of
    positional tensors with the batch on dim 0; ``loss_fn(outputs, target)`` returns a scalar.
    """

    config: TrainerConfig

    def backward(self, loss: torch.Tensor, num_tokens: Any = None) -> None:
        raise NotImplementedError

    def loss_parallel(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _note_tokens(self, num_tokens: Any) -> None:
        raise NotImplementedError

    def _pipeline_of(self, model: nn.Module) -> PipelineRunner | None:
        return getattr(self, "_pipelines", {}).get(id(model))

    def forward_backward(
        self,
        model: nn.Module,
        inputs: Any,
        target: Any,
        loss_fn: LossFn,
        *,
        num_tokens: Any = None,
    ) -> torch.Tensor:
        """Forward ``inputs``, compute ``loss_fn(outputs, target)`` and backpropagate it.

        ``loss_fn`` returns a mean, or with ``num_tokens`` a sum over those tokens (see
        :meth:`backward`); accumulation and microbatch scaling are handled here. Returns the
        detached loss of the whole batch (the mean, or the sum), the same on every rank of a
        pipeline.
        """
        runner = self._pipeline_of(model)
        if runner is None:
            outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            with self.loss_parallel():
                loss = loss_fn(outputs, target)
            self.backward(loss, num_tokens=num_tokens)
            return loss.detach()
        self._note_tokens(num_tokens)
        microbatches = runner.microbatches(_batch_of(inputs))
        accumulation = self.config.training_parameters.gradient_accumulation_steps
        scale = 1.0 if num_tokens is not None else 1.0 / (microbatches * accumulation)
        with self.loss_parallel():
            losses, _ = runner.step(inputs, target, loss_fn, scale, backward=True)
        return losses.sum() if num_tokens is not None else losses.mean()

    @torch.no_grad()
    def forward_loss(
        self, model: nn.Module, inputs: Any, target: Any, loss_fn: LossFn
    ) -> torch.Tensor:
        """``loss_fn(model(inputs), target)`` without backward (validation); under pipeline
        parallelism the mean of the microbatch losses, on every rank."""
        runner = self._pipeline_of(model)
        with self.loss_parallel():
            if runner is None:
                outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
                return loss_fn(outputs, target).detach()
            losses, _ = runner.step(inputs, target, loss_fn, 1.0, backward=False)
        return losses.mean()

    @torch.no_grad()
    def forward_outputs(self, model: nn.Module, inputs: Any) -> Any:
        """``model(inputs)`` without backward; under pipeline parallelism the last stage's
        outputs, sent to every rank of the pipeline."""
        runner = self._pipeline_of(model)
        if runner is None:
            return model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        return runner.outputs(inputs)


def _batch_of(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    return int(first.shape[0])


def iter_parts(parts: dict[str, list[nn.Module]]) -> Iterator[nn.Module]:
    """Every part of every model."""
    for model_parts in parts.values():
        yield from model_parts
