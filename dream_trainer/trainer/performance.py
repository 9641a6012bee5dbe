"""The per-window performance report: one all-gather of every rank's numbers, then the metrics.

:class:`PerformanceReport` joins the pieces: the loop's :class:`~.throughput.StepClock` window,
this rank's memory peaks (:mod:`.device_memory`), FLOPs and peak (:mod:`.flops`) and the rank
balance (:mod:`.rank_balance`). Per log window it makes one ``all_gather`` of a few floats per
rank over the CPU (gloo) group, so every rank computes the same reduced metrics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dream_trainer.trainer.device_memory import MemoryPeaks, memory_metrics
from dream_trainer.trainer.flops import flops_metrics
from dream_trainer.trainer.rank_balance import BalanceWarnings, balance_metrics
from dream_trainer.trainer.throughput import RankWindow, throughput_metrics
from dream_trainer.world import DistributedWorld

_MEMORY_KEYS = (
    "peak_allocated_gib",
    "peak_reserved_gib",
    "peak_rss_gib",
    "lifetime_peak_rss_gib",
)


class PerformanceReport:
    """Turns each rank's window into reduced metrics; warns (rank 0) about unbalanced ranks."""

    def __init__(self, world: DistributedWorld, warn_every_n_windows: int = 10) -> None:
        self.world = world
        self.memory = MemoryPeaks(world.device)
        self.warnings = BalanceWarnings(warn_every_n_windows)
        self.last_windows: list[RankWindow] = []
        """Every rank's window of the last report (index = global rank)."""

    def gather(self, window: RankWindow, peak_flops: float | None) -> list[list[float]]:
        """Every rank's numbers: window fields, memory peaks (NaN where absent), peak FLOP/s."""
        memory = self.memory.read()
        row = [
            *window.as_list(),
            *(memory.get(key, math.nan) for key in _MEMORY_KEYS),
            math.nan if peak_flops is None else peak_flops,
        ]
        mine = torch.tensor(row, dtype=torch.float64)
        if self.world.world_size == 1:
            return [row]
        rows = [torch.empty_like(mine) for _ in range(self.world.world_size)]
        dist.all_gather(rows, mine, group=self.world.cpu_group)
        return [r.tolist() for r in rows]

    def metrics(
        self,
        window: RankWindow,
        step: int,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> dict[str, float]:
        """The window's metrics (a collective: every rank calls it at the same log point)."""
        rows = self.gather(window, peak_flops)
        fields = RankWindow.FIELDS
        windows = [RankWindow.from_list(r[:fields]) for r in rows]
        self.last_windows = windows
        out = throughput_metrics(windows, self.world.dp_size)
        per_device = out.get("train/tokens_per_s_per_device")
        if flops_per_token is not None and per_device is not None:
            peaks = {r[-1] for r in rows}
            same_peak = len(peaks) == 1 and not math.isnan(next(iter(peaks)))
            # A peak known on every rank and equal everywhere; mixed devices get no MFU.
            out.update(
                flops_metrics(per_device, flops_per_token, peaks.pop() if same_peak else None)
            )
        memory = [
            {
                k: v
                for k, v in zip(_MEMORY_KEYS, r[fields : fields + len(_MEMORY_KEYS)])
                if not math.isnan(v)
            }
            for r in rows
        ]
        out.update(memory_metrics(memory))
        out.update(balance_metrics(windows))
        if self.world.is_global_zero:
            self.warnings.check(windows, step)
        return out
