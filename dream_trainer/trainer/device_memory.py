"""Per-rank memory peaks of each log window: accelerator memory and the process's resident set.

* CUDA (and ROCm): ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved``
  (the caching allocator's segments, what the device sees as used) since the previous window;
  the peaks are reset after each read. Reading them does not synchronize the device.
* Host: the peak resident set size (RSS) of this process. Linux keeps it as ``VmHWM`` in
  ``/proc/self/status`` and resets it to the current RSS when ``5`` is written to
  ``/proc/self/clear_refs``; where that works the peak is per window. Elsewhere (no /proc, or
  the write is refused) only ``getrusage``'s ``ru_maxrss`` is available: the peak over the
  process's whole life, which can never go down, so it is reported under another key
  (``lifetime_peak_rss_gib``) rather than passed off as the window's peak.

DataLoader worker processes are not counted in RSS: they are processes of their own.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GIB = float(2**30)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_vm_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, else KiB


class MemoryPeaks:
    """Reads this rank's memory peaks once per window and starts the next window's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.windowed_rss = _vm_hwm_bytes() is not None and _reset_vm_hwm()
        self.reset()

    @property
    def rss_key(self) -> str:
        return "peak_rss_gib" if self.windowed_rss else "lifetime_peak_rss_gib"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.windowed_rss:
            self.windowed_rss = _reset_vm_hwm()

    def read(self) -> dict[str, float]:
        """This rank's peaks in GiB since the last read (RSS: see :attr:`rss_key`), then reset."""
        out: dict[str, float] = {}
        if self.cuda:
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        key = self.rss_key
        hwm = _vm_hwm_bytes() if self.windowed_rss else None
        if hwm is None:
            key = "lifetime_peak_rss_gib"
            self.windowed_rss = False
            hwm = _lifetime_peak_rss_bytes()
        out[key] = hwm / GIB
        self.reset()
        return out


def memory_metrics(per_rank: list[dict[str, float]], prefix: str = "memory/") -> dict[str, float]:
    """Each peak as its maximum over ranks (``{key}``) and its mean (``{key}_mean``).

    A key missing on some rank (e.g. one rank lost the windowed RSS) is reported from the ranks
    that have it.
    """
    keys = sorted({key for values in per_rank for key in values})
    out: dict[str, float] = {}
    for key in keys:
        values = [rank[key] for rank in per_rank if key in rank]
        out[f"{prefix}{key}"] = max(values)
        out[f"{prefix}{key}_mean"] = sum(values) / len(values)
    return out
