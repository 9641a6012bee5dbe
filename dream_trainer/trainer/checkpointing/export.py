"""Consolidated weights out of a checkpoint, and safetensors files in and out.

:func:`checkpoint_tensors` reads a checkpoint's model tensors in one process, without a process
group, whatever layout saved them; :func:`export_safetensors` writes them to a ``.safetensors``
file (no pickle: other tools load it safely). safetensors is imported only when used.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dream_trainer.trainer.checkpointing.safe_io import SafeLoadPlanner, SafeReader
from dream_trainer.trainer.checkpointing.storage import COMPLETE, complete_checkpoints

__all__ = [
    "checkpoint_tensors",
    "export_safetensors",
    "load_safetensors",
    "safetensors_files",
]

Rename = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def checkpoint_tensors(
    path: str | os.PathLike[str], prefix: str = "models.model."
) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors saved under ``prefix`` in the checkpoint at ``path``, keyed by
    their names without ``prefix``. Runs in one process; holds every tensor in CPU memory."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        found = complete_checkpoints(path) if path.is_dir() else []
        hint = f"; the newest complete one under it is {found[-1].path}" if found else ""
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (it has no {COMPLETE}); give a step_* "
            f"directory of a run's checkpoints{hint}"
        )
    metadata = SafeReader(str(path)).read_metadata()
    template: dict[str, Any] = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not template:
        models = sorted(
            {k.split(".")[1] for k in metadata.state_dict_metadata if k.startswith("models.")}
        )
        raise KeyError(
            f"the checkpoint {path} has no tensors under {prefix!r}; its models are "
            f"{', '.join(map(repr, models)) or 'none'}"
        )
    try:
        with warnings.catch_warnings():  # no_dist is what we ask for: no need to warn about it
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                template,
                storage_reader=SafeReader(str(path)),
                planner=SafeLoadPlanner(),
                no_dist=True,
            )
    except CheckpointException as error:  # DCP wraps what failed (a BaseException): unwrap it
        (cause, _), *_ = error.failures.values()
        raise cause from error
    return {key.removeprefix(prefix): tensor for key, tensor in template.items()}


def export_safetensors(
    path: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    model: str = "model",
    dtype: torch.dtype | None = None,
    rename: Rename | None = None,
) -> Path:
    """Write model ``model`` of the checkpoint at ``path`` to the safetensors file ``out_file``.

    ``rename(name, tensor)`` returns the ``{name: tensor}`` entries one tensor becomes (renamed,
    split, permuted, or none); then floating-point tensors are cast to ``dtype``. Returns the
    file's path (written under a temporary name, then renamed).
    """
    from safetensors.torch import save_file

    tensors = checkpoint_tensors(path, prefix=f"models.{model}.")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for new_name, value in (rename(name, tensor) if rename else {name: tensor}).items():
            if new_name in out:
                raise ValueError(f"rename gives two tensors the name {new_name!r}")
            out[new_name] = value
    seen: set[int] = set()
    for name, value in out.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen and value.numel():  # safetensors refuses shared (tied) storage
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_file)
    return out_file


def load_safetensors(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU (the format holds no code: safe to load)."""
    import safetensors
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except getattr(safetensors, "SafetensorError", ValueError) as error:
        raise RuntimeError(
            f"the safetensors file {file} is truncated or corrupted ({error})"
        ) from error


def safetensors_files(path: str | os.PathLike[str]) -> list[Path] | None:
    """The safetensors files ``path`` stands for: itself (``*.safetensors``), or a directory's
    ``model.safetensors`` or the shards its ``model.safetensors.index.json`` lists; None if
    ``path`` is none of these (e.g. a DCP checkpoint)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return [path]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RuntimeError(f"{index} is not a safetensors index ({error})") from error
    return None
