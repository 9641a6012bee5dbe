"""Models found on a trainer, and attributes that alias into them (``self.encoder = self.model.encoder``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def drop_aliases(found: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Keep each module once, and drop modules that live inside another found module."""
    kept: dict[str, nn.Module] = {}
    for name, module in found.items():
        inside_other = any(
            other is not module and any(sub is module for sub in other.modules())
            for other in found.values()
        )
        if inside_other or any(module is k for k in kept.values()):
            continue
        kept[name] = module
    return kept


def aliases_into(owner: Any, replacements: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    """Attributes of ``owner`` that are submodules of a replaced model, mapped into its copy.

    A submodule the copy lacks (a pipeline stage without it) maps to ``None``.
    """
    found: dict[str, nn.Module | None] = {}
    for model_name, copy_ in replacements.items():
        paths = {id(m): path for path, m in getattr(owner, model_name).named_modules() if path}
        for attr, value in vars(owner).items():
            if attr not in replacements and isinstance(value, nn.Module) and id(value) in paths:
                try:
                    found[attr] = copy_.get_submodule(paths[id(value)])
                except AttributeError:
                    found[attr] = None
    return found


def fsdp_replicate() -> Any:
    """torch's FSDP2-based ``replicate`` (handles tensor-parallel DTensor parameters)."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as error:  # pragma: no cover - present in every supported torch
        raise RuntimeError(
            "this torch has no FSDP2-based replicate (torch.distributed._composable."
            "replicate_with_fsdp); use DeviceParameters.HSDP or override apply_replicate"
        ) from error
    return replicate
