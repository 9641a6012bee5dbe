"""Dumping torch's flight recorder (the last collectives this rank issued) into a hang report.

The recorder keeps ``TORCH_FR_BUFFER_SIZE`` entries (``TORCH_NCCL_TRACE_BUFFER_SIZE`` for NCCL;
the world sets both from ``device_parameters.comm.flight_recorder_buffer_size``). Its dump is
``torch._C._distributed_c10d._dump_nccl_trace`` on NCCL builds and ``_dump_fr_trace`` where torch
has the backend-neutral recorder (gloo records into it in torch 2.13); both are feature-detected.
Files are named ``fr_trace_rank_<rank>`` so that ``torchfrtrace DIR`` (``python -m
torch.distributed.flight_recorder.fr_trace DIR``) can merge the ranks' dumps.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

__all__ = ["FILE_PREFIX", "buffer_size", "dump_flight_recorder"]

FILE_PREFIX = "fr_trace_rank_"
BUFFER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")


def buffer_size() -> int:
    """Entries the recorder keeps, from the environment (0: it is off)."""
    for name in BUFFER_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _count_entries(data: bytes) -> int | None:
    try:
        loaded = pickle.loads(data)  # this process's own dump
    except Exception:
        return None
    entries = loaded.get("entries") if isinstance(loaded, dict) else None
    return len(entries) if isinstance(entries, list) else None


def dump_flight_recorder(backend: str, directory: Path | None, rank: int) -> str:
    """Write this rank's recorder buffer under ``directory`` (else the temp dir); say what happened."""
    size = buffer_size()
    if size == 0:
        return (
            "flight recorder: off (set device_parameters.comm.flight_recorder_buffer_size, e.g. "
            "2000, to keep each rank's last collectives)"
        )
    c10d = getattr(torch._C, "_distributed_c10d", None)
    dump = getattr(c10d, "_dump_nccl_trace", None) if backend == "nccl" else None
    dump = dump or getattr(c10d, "_dump_fr_trace", None)
    if dump is None:
        return f"flight recorder: none for {backend} in torch {torch.__version__}"
    try:
        data = bytes(dump())
    except Exception as error:
        return f"flight recorder: the dump failed ({type(error).__name__}: {error})"
    entries = _count_entries(data)
    if entries == 0:
        return f"flight recorder: no entries recorded for {backend} in torch {torch.__version__}"
    folder = directory if directory is not None else Path(tempfile.gettempdir())
    path = folder / f"{FILE_PREFIX}{rank}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as error:
        return f"flight recorder: could not write {path} ({error})"
    count = "?" if entries is None else str(entries)
    return (
        f"flight recorder: {count} entries written to {path} (merge every rank's dump with "
        f"`torchfrtrace {folder}`)"
    )
