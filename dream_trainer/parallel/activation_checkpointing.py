"""Activation checkpointing of blocks: full recomputation or selective (op-level) recomputation.

Both use torch's composable ``checkpoint`` (hooks on the module; parameter names unchanged).
*Full* keeps only a block's inputs and reruns its whole forward in backward. *Selective*
also keeps the outputs of the ops in :data:`SAVED_OPS` (matrix multiplies, attention, the
tensor-parallel reduce-scatter) through torch's ``create_selective_checkpoint_contexts``, so
backward reruns only the cheap elementwise ops (norms, activations, RoPE, casts): memory lies
between no checkpointing and full, and recomputation costs few FLOPs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["SAVED_OPS", "checkpoint_blocks", "saved_ops"]

CheckpointMode = Literal["full", "selective"]

SAVED_OPS = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.baddbmm.default",
    "aten._scaled_mm.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    # Recomputing it would repeat a collective. The all-gathers before attention and the
    # feed-forward are recomputed instead: keeping them would store the unsharded sequence
    # and undo sequence parallelism's memory saving.
    "_c10d_functional.reduce_scatter_tensor.default",
)
"""Ops whose outputs selective checkpointing keeps (those this torch build lacks are skipped)."""


def saved_ops() -> frozenset[Any]:
    """The :data:`SAVED_OPS` that exist in this torch build, as op overloads."""
    found = set()
    for name in SAVED_OPS:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return frozenset(found)


def _selective_context_fn() -> Callable[[], Any]:
    from torch.utils import checkpoint as torch_checkpoint

    create = getattr(torch_checkpoint, "create_selective_checkpoint_contexts", None)
    policy_type = getattr(torch_checkpoint, "CheckpointPolicy", None)
    if create is None or policy_type is None:
        raise RuntimeError(
            f"activation_checkpoint_config.mode='selective' needs torch.utils.checkpoint."
            f"create_selective_checkpoint_contexts, which torch {torch.__version__} lacks; "
            "use mode='full' or a torch release that has it"
        )
    keep = saved_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return policy_type.MUST_SAVE if op in keep else policy_type.PREFER_RECOMPUTE

    return functools.partial(create, policy)


def checkpoint_blocks(
    blocks: Sequence[nn.Module], mode: CheckpointMode = "full", every_n_blocks: int = 1
) -> list[nn.Module]:
    """Checkpoint blocks ``0, n, 2n, ...`` of ``blocks`` in place; returns those checkpointed."""
    from torch.distributed._composable import checkpoint

    if mode not in ("full", "selective"):
        raise ValueError(
            f"activation_checkpoint_config.mode must be 'full' or 'selective', got {mode!r}"
        )
    if every_n_blocks < 1:
        raise ValueError(
            "activation_checkpoint_config.every_n_blocks must be a positive count, got "
            f"{every_n_blocks}"
        )
    options = {"context_fn": _selective_context_fn()} if mode == "selective" else {}
    chosen = list(blocks)[::every_n_blocks]
    for block in chosen:
        checkpoint(block, **options)
    return chosen
