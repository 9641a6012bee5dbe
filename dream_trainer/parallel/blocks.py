"""The repeated blocks of a model, for per-block sharding, compiling and checkpointing."""

from __future__ import annotations

from torch import nn


def declared_blocks(model: nn.Module) -> list[nn.Module]:
    """Children of the model's own ``nn.ModuleList`` / ``nn.ModuleDict`` attributes.

    A transformer keeps its layers in such a container (``model.layers``); those layers are
    the units that FSDP shards, ``torch.compile`` compiles and activation checkpointing wraps.
    """
    blocks: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif isinstance(child, nn.ModuleDict):
            blocks.extend(child.values())
    return blocks
