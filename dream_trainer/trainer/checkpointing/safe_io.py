"""Reading checkpoints without unpickling arbitrary objects, and JSON for the small state.

torch's DCP reader unpickles the ``.metadata`` file with ``pickle.load`` and non-tensor values
with ``torch.load(weights_only=False)``: a downloaded checkpoint could run code when loaded.
:class:`SafeReader` unpickles metadata with an allow-list of DCP's own metadata classes, and
:class:`SafeLoadPlanner` loads non-tensor values with ``weights_only=True`` (tensors and plain
containers only). Small per-run and per-rank state goes to JSON; tensors in it (RNG states) are
stored as base64 bytes with their dtype and shape.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["SafeLoadPlanner", "SafeReader", "UnsafeCheckpointError", "read_json", "write_json"]

_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file refers to something other than DCP metadata; it is not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED or module in _ALLOWED_MODULES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self.path} asks to load {module}.{name}, which is not part of a checkpoint's "
                "metadata; it was not loaded (a checkpoint file may have been replaced)"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata unpickling allows only DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream, str(path)).load()
        except (EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
            raise RuntimeError(
                f"the checkpoint metadata file {path} is truncated or corrupted ({error}); "
                "resume from another checkpoint"
            ) from error
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads non-tensor values with ``weights_only=True``: plain containers, no code."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"the checkpoint value {read_item.dest_index.fqn!r} is not plain data "
                f"(tensors, numbers, strings, lists, dicts); it was not loaded: {error}"
            ) from error
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ----------------------------------------------------------------------------- JSON state


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        return {
            "__tensor__": base64.b64encode(data).decode("ascii"),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
        }
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{type(value).__name__} cannot be saved in a checkpoint's JSON state; state_dict() "
        "values must be tensors, numbers, strings, lists or dicts"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            raw = bytearray(base64.b64decode(value["__tensor__"]))
            flat = (
                torch.frombuffer(raw, dtype=torch.uint8)
                if raw
                else torch.empty(0, dtype=torch.uint8)
            )
            return flat.view(dtype).reshape(value["shape"]).clone()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def write_json(path: Path, state: Any) -> None:
    """Write ``state`` (tensors allowed) as JSON, through a temporary file then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_encode(state), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """What :func:`write_json` wrote; an error naming the file if it is not valid JSON."""
    try:
        return _decode(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError) as error:
        raise RuntimeError(
            f"the checkpoint file {path} is truncated or corrupted ({error}); resume from "
            "another checkpoint"
        ) from error
