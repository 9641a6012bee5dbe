"""One module over a rank's pipeline parts, with the unsplit model's parameter names.

A rank holding stages 0 and 2 of a model has two parts; optimizers, state dicts and gradient
norms want one module whose ``named_parameters()`` are ``tok_embeddings.weight``,
``layers.0...``, ``layers.4...`` as in the unsplit model. :func:`merge_parts` builds that view:
it references the parts' own submodules and parameters (nothing is copied), so updating through
it updates the parts the pipeline runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dream_trainer.parallel.pipeline.split import SparseModuleList

__all__ = ["ModelParts", "merge_parts"]


class ModelParts(nn.Module):
    """This rank's pipeline parts of one model, seen as one module (for optimizers and state).

    It cannot run: under pipeline parallelism the trainer's ``forward_backward``,
    ``forward_loss`` and ``forward_outputs`` run the parts through the pipeline schedule.
    """

    def __init__(self, parts: Sequence[nn.Module], stage_indices: Sequence[int]) -> None:
        super().__init__()
        # Not registered as submodules: their names would prefix every parameter name.
        object.__setattr__(self, "parts", list(parts))
        object.__setattr__(self, "stage_indices", list(stage_indices))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this model is split into pipeline stages (pipeline_parallel > 1), so it cannot be "
            "called directly; use self.forward_backward(model, inputs, target, loss_fn) in "
            "training_step, self.forward_loss(...) in validation_step, or "
            "self.forward_outputs(model, inputs) for outputs"
        )

    def train(self, mode: bool = True) -> ModelParts:
        super().train(mode)
        parts: list[nn.Module] = self.__dict__["parts"]
        for part in parts:
            part.train(mode)
        return self

    def __repr__(self) -> str:
        return f"ModelParts(stages={self.stage_indices}, parts={self.parts})"


def merge_parts(parts: Sequence[nn.Module], stage_indices: Sequence[int]) -> ModelParts:
    """A :class:`ModelParts` whose tree is the union of ``parts`` under their shared names."""
    merged = ModelParts(parts, stage_indices)
    _merge_into(merged, list(parts), "")
    return merged


def _merge_into(target: nn.Module, copies: list[nn.Module], prefix: str) -> None:
    for name, tensor in _direct_tensors(copies, prefix):
        if isinstance(tensor, nn.Parameter):
            target.register_parameter(name, tensor)
        else:
            target.register_buffer(name, tensor)
    names: list[str] = []
    for copy in copies:
        names += [n for n in copy._modules if n not in names]
    for name in names:
        children = [c._modules.get(name) for c in copies]
        distinct = list({id(c): c for c in children if c is not None}.values())
        if not distinct:
            continue
        if len(distinct) == 1:
            target.add_module(name, distinct[0])
            continue
        node = _container_like(distinct)
        _merge_into(node, distinct, f"{prefix}{name}.")
        target.add_module(name, node)


def _direct_tensors(copies: list[nn.Module], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}
    for copy in copies:
        tensors = [*copy._parameters.items(), *copy._buffers.items()]
        for name, tensor in tensors:
            if tensor is None:
                continue
            earlier = seen.get(name)
            if earlier is None:
                seen[name] = tensor
                yield name, tensor
            elif earlier is not tensor and isinstance(tensor, nn.Parameter):
                raise ValueError(
                    f"two pipeline parts of this rank both hold the parameter {prefix}{name}; "
                    "each parameter must live on exactly one stage"
                )


def _container_like(children: list[nn.Module]) -> nn.Module:
    if all(isinstance(c, SparseModuleList) for c in children):
        return SparseModuleList()
    if all(isinstance(c, nn.ModuleDict) for c in children):
        return nn.ModuleDict()
    return nn.Module()
