"""Copy full (unsharded) weights into a parallelized module, whatever its layout."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that insert a level into parameter names without changing the model.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module")

_DISTRIBUTE_TAKES_SRC_RANK = "src_data_rank" in inspect.signature(distribute_tensor).parameters


def canonical_name(name: str) -> str:
    """A parameter name with compile / checkpoint / DDP wrapper levels removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def local_piece(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's part of ``full`` under ``like``'s mesh and placements, without communication."""
    kwargs = {"src_data_rank": None} if _DISTRIBUTE_TAKES_SRC_RANK else {}
    full = full.to(device=like.to_local().device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, **kwargs).to_local()


@torch.no_grad()
def load_full_weights(module: nn.Module, full: nn.Module) -> None:
    """Copy every parameter and buffer of ``full`` (same architecture, unsharded) into ``module``.

    Every rank must hold the same ``full`` values; each keeps only its own shard. Tensors are
    matched by name, ignoring wrapper levels such as ``_orig_mod``; a name in ``module`` that
    ``full`` lacks is an error.
    """
    sources: dict[str, torch.Tensor] = {
        canonical_name(n): t for n, t in full.named_parameters(remove_duplicate=False)
    }
    sources.update({canonical_name(n): t for n, t in full.named_buffers(remove_duplicate=False)})
    targets: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    targets += list(module.named_buffers(remove_duplicate=False))
    for name, target in targets:
        key = canonical_name(name)
        if key not in sources:
            raise KeyError(
                f"{type(module).__name__} has {name!r} but the full copy has no {key!r}; "
                "the model must build the same tensors before and after parallelization"
            )
        source = sources[key]
        if isinstance(target, DTensor):
            target.to_local().copy_(local_piece(source, target))
        else:
            target.copy_(source.to(device=target.device, dtype=target.dtype))
