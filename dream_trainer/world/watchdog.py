"""A thread per rank that notices a hang, reports which ranks did not arrive, and ends the job.

Every ``interval`` seconds (a fifth of the hang timeout, at most 5 s) the thread publishes this
rank's :class:`~dream_trainer.world.rank_records.RankRecord` in the c10d store and checks the
rank's :class:`~dream_trainer.world.progress.Progress`. The job is reported as hung when

* this rank has not moved (no new phase or batch) for the hang timeout: the thread writes the
  report, dumps every thread's Python stack, and ends the process with ``os._exit(EXIT_CODE)``
  after ``grace`` seconds unless the process has ended, or its main thread has started
  tearing down (:meth:`HangWatchdog.stop`), by then; or
* a collective failed in the main thread (a timeout, a lost peer): the trainer calls
  :meth:`HangWatchdog.report_failure` before tearing down and re-raising, so the job fails with
  that error.

Why ``os._exit`` from the thread rather than an exception in the main thread: the main thread of
a hung rank is blocked, in a collective's wait, a dataloader or user code, often inside C code
that runs no Python signal handler and no asynchronous exception until it returns, which is
what a hang is. Only ending the process works in every case. The grace period lets a main
thread whose collective is about to time out raise that error and tear down normally first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from dream_trainer.world.flight_recorder import dump_flight_recorder
from dream_trainer.world.hang_report import format_report, ranks_behind
from dream_trainer.world.process_groups import registered_groups
from dream_trainer.world.progress import Phase, Progress
from dream_trainer.world.rank_records import RankRecord, RecordBoard

if TYPE_CHECKING:
    from dream_trainer.world.distributed_world import DistributedWorld

__all__ = ["EXIT_CODE", "HangWatchdog", "looks_like_collective_failure"]

logger = logging.getLogger("dream_trainer.hang")

EXIT_CODE = 124
"""The exit code of a rank the watchdog ends (as GNU ``timeout`` uses)."""

SLOW_PHASES = frozenset({Phase.CHECKPOINT, Phase.FINISH})
"""Phases that always get the longer (first-run) limit: a synchronous save of a large model
is I/O-bound and may take minutes on every rank at once without any rank being hung."""

_FAILURE_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset")


def looks_like_collective_failure(error: BaseException) -> bool:
    """A torch.distributed error, or a RuntimeError saying a collective timed out or lost a peer."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _FAILURE_WORDS)


class HangWatchdog:
    """Watches one rank's :class:`Progress`; see the module documentation.

    ``hang_timeout``: seconds without progress that make a hang. ``first_run_timeout``: the
    limit for a phase this rank has not finished yet in this fit (a first step that compiles,
    a first validation) and for the :data:`SLOW_PHASES`. ``board``: where the ranks' records are shared (None: this rank's own
    record only). ``exit_process`` replaces ``os._exit`` (tests).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        progress: Progress,
        *,
        hang_timeout: float,
        first_run_timeout: float | None = None,
        board: RecordBoard | None = None,
        groups: Callable[[], list[Any]] = registered_groups,
        backend: str = "gloo",
        report_dir: Path | None = None,
        interval: float | None = None,
        grace: float = 10.0,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self.hang_timeout = hang_timeout
        self.first_run_timeout = max(hang_timeout, first_run_timeout or hang_timeout)
        self.board = board
        self.groups = groups
        self.backend = backend
        self.report_dir = report_dir
        self.interval = interval if interval is not None else min(5.0, hang_timeout / 5)
        self.stale_after = 3 * self.interval + 2.0
        self.grace = grace
        self._exit = exit_process
        self._stop = threading.Event()
        self._keep_alive = threading.Event()
        self._thread: threading.Thread | None = None
        self._board_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._publish_failed = False
        self.report_text: str | None = None
        self.fired = False
        """It found a hang and ends the process after ``grace`` unless :meth:`stop` is called."""

    @classmethod
    def for_world(
        cls, world: DistributedWorld, progress: Progress, report_dir: Path | None = None
    ) -> HangWatchdog | None:
        """A watchdog configured from ``world.device_parameters.comm``; None when it is off.

        It is off with ``hang_watchdog=False`` and for a world of one rank (nobody to wait for;
        a single process is interrupted by hand, and ending a notebook's kernel would hurt).
        """
        comm = world.device_parameters.comm
        if not comm.hang_watchdog or world.world_size == 1:
            return None
        hang = comm.effective_hang_timeout_seconds
        return cls(
            world.rank,
            world.world_size,
            progress,
            hang_timeout=hang,
            first_run_timeout=comm.init_timeout_seconds,
            board=RecordBoard.from_default_group(world.rank, world.world_size),
            backend=str(dist.get_backend()),
            report_dir=report_dir,
        )

    # Lifecycle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> HangWatchdog:
        if self.running:
            return self
        self._stop.clear()
        self._keep_alive.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"dream-trainer-hang-watchdog-rank{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """End the thread (returns once it has ended); ``clean`` also removes this rank's record.

        Called from the main thread's teardown, it also cancels an exit the watchdog has
        scheduled: that thread is no longer hung, and it re-raises its error once torn down.
        """
        self._stop.set()
        self._keep_alive.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.interval + 10.0)
        if clean and not self.fired and self.board is not None:
            with self._board_lock, contextlib.suppress(Exception):
                self.board.clear()

    # Reports

    def report_failure(self, error: BaseException) -> str | None:
        """Report a hang if ``error`` (raised in the main thread) is a collective failure."""
        if not looks_like_collective_failure(error):
            return None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return self.report(f"a collective failed: {type(error).__name__}: {first_line[:300]}")

    def report(self, reason: str, stacks: bool = False) -> str | None:
        """Write the hang report once (later calls return None); return its text."""
        with self._report_lock:
            if self.report_text is not None:
                return None
            self.report_text = ""
        now = time.time()
        own = RankRecord.of(self.rank, self.progress.position, self.groups(), now)
        records, notes = self._read_records(own)
        folder = self.report_dir
        notes.append(
            dump_flight_recorder(
                self.backend, None if folder is None else folder / "flight_recorder", self.rank
            )
        )
        if stacks:
            notes.append(self._dump_stacks())
        text = format_report(
            rank=self.rank,
            reason=reason,
            own=own,
            records=records,
            world_size=self.world_size,
            now=now,
            stale_after=self.stale_after,
            extra=notes,
        )
        self.report_text = text
        logger.error("%s", text)
        self._write_report(text, records, now)
        return text

    def _read_records(self, own: RankRecord) -> tuple[dict[int, RankRecord], list[str]]:
        notes: list[str] = []
        records: dict[int, RankRecord] = {}
        if self.board is None:
            notes.append("the other ranks' records: none (no c10d store to read them from)")
        else:
            try:
                with self._board_lock:
                    self.board.publish(own)
                    records = self.board.read_all()
            except Exception as error:
                notes.append(f"the other ranks' records: could not read the store ({error})")
        records[self.rank] = own
        return records, notes

    def _dump_stacks(self) -> str:
        path = None if self.report_dir is None else self.report_dir / f"rank_{self.rank}.stacks"
        try:
            if path is None:
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                return "python stacks of every thread: above, on stderr"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as file:
                faulthandler.dump_traceback(file=file, all_threads=True)
            return f"python stacks of every thread: {path}"
        except (OSError, ValueError, AttributeError) as error:  # no usable file descriptor
            return f"python stacks: could not be dumped ({error})"

    def _write_report(self, text: str, records: dict[int, RankRecord], now: float) -> None:
        if self.report_dir is None:
            return
        behind = ranks_behind(records, self.world_size, now, self.stale_after)
        content = {
            "rank": self.rank,
            "time": now,
            "report": text,
            "behind": [{"rank": b.rank, "reason": b.reason} for b in behind],
            "records": {str(r): asdict(rec) for r, rec in sorted(records.items())},
        }
        path = self.report_dir / f"rank_{self.rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=1))
        except OSError as error:
            logger.error(
                "rank %d: could not write the hang report to %s (%s)", self.rank, path, error
            )

    # The thread

    def _limit(self, phase: str) -> float:
        if phase in SLOW_PHASES or not self.progress.has_finished(phase):
            return self.first_run_timeout
        return self.hang_timeout

    def _publish(self) -> None:
        if self.board is None:
            return
        record = RankRecord.of(self.rank, self.progress.position, self.groups())
        try:
            with self._board_lock:
                self.board.publish(record)
        except Exception as error:  # the store's server is gone: say so once, keep watching
            if not self._publish_failed:
                logger.warning("rank %d: could not publish its hang record (%s)", self.rank, error)
            self._publish_failed = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._publish()
            position = self.progress.position
            limit = self._limit(position.phase)
            stuck = position.seconds_in_phase()
            if stuck > limit:
                self.fired = True
                try:
                    self.report(
                        f"no progress for {stuck:.1f} s at step {position.step} in phase "
                        f"{position.phase} (the hang timeout is {limit:g} s)",
                        stacks=True,
                    )
                except Exception:  # the process must end all the same
                    logger.exception("rank %d: writing the hang report failed", self.rank)
                self._end_process()
                return
            if self._stop.wait(self.interval):
                return

    def _end_process(self) -> None:
        logger.error(
            "rank %d: ending this process with exit code %d in %g s unless it ends first",
            self.rank,
            EXIT_CODE,
            self.grace,
        )
        if self._keep_alive.wait(self.grace):
            logger.error(
                "rank %d: the main thread is tearing down; leaving the exit to it", self.rank
            )
            return
        for handler in logging.getLogger().handlers + logger.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(EXIT_CODE)
