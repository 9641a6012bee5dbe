"""How evenly the ranks work: per-rank step time and busy fraction, their spread, and warnings.

Every rank's :class:`~dream_trainer.trainer.throughput.RankWindow` is gathered once per log
window. A rank's *own step time* is its time inside steps per step (data loading included, the
log barrier not); its *busy fraction* is the share of its training time spent neither in the
loader's ``next()`` nor at the log barrier.

What this can see: waiting at the loader and at the log point's all-reduce. What it cannot:
waiting inside a step's own collectives (the gradient all-reduce or reduce-scatter of DDP/FSDP,
tensor-parallel collectives, pipeline send/recv) counts as busy, because the host cannot tell
it from computing without a profiler. So a rank slowed *inside* the step of a data-parallel run
makes every rank equally slow and shows no spread; the throughput metrics show the cost.

Two patterns are warned about (from rank 0, at most once per ``every_n_windows`` windows each):

* **imbalance**: the slowest rank's own step time is at least ``SPREAD_LIMIT`` times the
  fastest's, or a rank is busy less than ``IDLE_BELOW`` of the time while another is busy more
  than ``BUSY_ABOVE``. The message names the slow and the idle ranks.
* **taking turns**: no rank is busy ``TURNS_MAX_BUSY`` of the time or more, the busy fractions
  add up to about one rank's worth (at most ``TURNS_MAX_SUM``) and the ranks wait mostly at the
  log barrier rather than on data: the ranks work one after another instead of side by side,
  the classic symptom of naive model parallelism where data parallelism was meant.
"""

from __future__ import annotations

import logging

from dream_trainer.trainer.throughput import RankWindow

logger = logging.getLogger("dream_trainer.metrics")

SPREAD_LIMIT = 1.5
IDLE_BELOW = 0.5
BUSY_ABOVE = 0.8
TURNS_MAX_BUSY = 0.75
TURNS_MAX_SUM = 1.25


def own_step_times(windows: list[RankWindow]) -> list[float]:
    """Each rank's time inside steps per step, in seconds (the log barrier left out)."""
    return [w.step_s / w.steps if w.steps else 0.0 for w in windows]


def balance_metrics(windows: list[RankWindow], prefix: str = "ranks/") -> dict[str, float]:
    """Spread of the ranks' own step times and their busy fractions (empty on one rank)."""
    if len(windows) < 2:
        return {}
    times = own_step_times(windows)
    busy = [w.busy_fraction for w in windows]
    out = {
        f"{prefix}step_time_min_s": min(times),
        f"{prefix}step_time_max_s": max(times),
        f"{prefix}busy_fraction_min": min(busy),
        f"{prefix}busy_fraction_mean": sum(busy) / len(busy),
    }
    if min(times) > 0:
        out[f"{prefix}step_time_spread"] = max(times) / min(times)
    return out


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def diagnose(windows: list[RankWindow]) -> dict[str, str]:
    """Warnings for this window by kind (``imbalance``, ``turns``); empty when balanced."""
    if len(windows) < 2 or windows[0].steps <= 0:
        return {}
    times = own_step_times(windows)
    busy = [w.busy_fraction for w in windows]
    found: dict[str, str] = {}
    fastest, slowest = min(times), max(times)
    spread = slowest / fastest if fastest > 0 else float("inf")
    idle = [r for r, b in enumerate(busy) if b < IDLE_BELOW]
    if spread >= SPREAD_LIMIT or (idle and max(busy) > BUSY_ABOVE):
        slow = [r for r, t in enumerate(times) if t >= slowest - 0.1 * (slowest - fastest)]
        fast = [r for r, t in enumerate(times) if t <= fastest + 0.1 * (slowest - fastest)]
        parts = [
            f"{_ranks(slow)} took {slowest:.3g} s per step, {_ranks(fast)} {fastest:.3g} s "
            f"(spread {spread:.2f}x)"
        ]
        for r in idle:
            w = windows[r]
            parts.append(
                f"rank {r} was busy only {_percent(busy[r])} of the time (waiting on data "
                f"{_percent(w.data_s / w.train_s)}, at the log barrier "
                f"{_percent(w.barrier_s / w.train_s)})"
            )
        found["imbalance"] = (
            "ranks are unevenly loaded: "
            + "; ".join(parts)
            + ". The fast ranks wait for the slow ones; balance the work (data shares, "
            "per-rank work in training_step) or find what slows the slow ranks."
        )
    barrier = sum(w.barrier_s for w in windows)
    data = sum(w.data_s for w in windows)
    if max(busy) < TURNS_MAX_BUSY and sum(busy) <= TURNS_MAX_SUM and barrier > data:
        shown = ", ".join(f"rank {r} {_percent(b)}" for r, b in enumerate(busy))
        found["turns"] = (
            f"the ranks take turns: busy {shown} of the time, {sum(busy):.2f} ranks' worth "
            f"over {len(busy)} ranks, each waiting at the log barrier while another works "
            "(ranks working side by side are each busy near 100%). This is what model "
            "parallelism run one rank at a time looks like (layers on different ranks without "
            "pipelining, ranks serialized by hand); for data parallelism, give every rank the "
            "whole model and its own share of the data."
        )
    return found


class BalanceWarnings:
    """Logs :func:`diagnose`'s findings, each kind at most once per ``every_n_windows``."""

    def __init__(self, every_n_windows: int = 10) -> None:
        self.every_n_windows = every_n_windows
        self._since: dict[str, int] = {}

    def check(self, windows: list[RankWindow], step: int) -> dict[str, str]:
        """Diagnose one window; log (and return) the findings not warned about recently."""
        for kind in self._since:
            self._since[kind] += 1
        warned: dict[str, str] = {}
        for kind, message in diagnose(windows).items():
            if self._since.get(kind, self.every_n_windows) >= self.every_n_windows:
                self._since[kind] = 0
                warned[kind] = message
                logger.warning("step %d: %s", step, message)
        return warned
