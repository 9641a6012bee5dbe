"""End a worker whose launcher died, instead of letting it train on with nobody to report to.

When torchrun's agent is killed with SIGKILL it cannot stop its workers, and they are re-parented
(to init or a subreaper). A daemon thread notices that ``os.getppid()`` changed, sends SIGTERM to
its own process so that handlers can run, and calls ``os._exit`` if the process is still alive
after a grace period (the main thread may be blocked in a collective and never run a handler).
``prctl(PR_SET_PDEATHSIG)`` is not used: it fires when the parent *thread* that forked us exits,
and torchrun does not promise that this is its main thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger("dream_trainer.world")

# (pid, parent pid) when this module was first imported: a worker's parent may already be gone by
# the time the watch starts (importing torch takes seconds). A forked child has another pid, so
# it never takes its parent's record for its own.
_AT_IMPORT = (os.getpid(), os.getppid())

EXIT_CODE = 128 + signal.SIGTERM
"""What ``os._exit`` is given when SIGTERM did not end the process: the shell's code for it."""


class ParentWatch:
    """A daemon thread that ends this process when its parent process dies.

    ``on_parent_death`` replaces the default ending (SIGTERM, then ``os._exit`` after ``grace``
    seconds); tests pass one so that the watching process survives.
    """

    def __init__(
        self,
        rank: int,
        *,
        interval: float = 0.5,
        grace: float = 3.0,
        on_parent_death: Callable[[int], None] | None = None,
    ) -> None:
        self.rank = rank
        self.interval = interval
        self.grace = grace
        self._on_parent_death = on_parent_death
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.parent_pid = 0
        self.fired = False
        """The parent died and this process is being ended; :meth:`stop` no longer cancels it."""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ParentWatch:
        """Record the parent pid and start polling it (no-op if already running)."""
        if self.running:
            return self
        pid, parent_at_import = _AT_IMPORT
        self.parent_pid = parent_at_import if pid == os.getpid() else os.getppid()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"dream-trainer-parent-watch-rank{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; returns once the thread has ended (at most one interval)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and not self.fired and thread is not threading.current_thread():
            thread.join(timeout=self.interval + 1.0)

    def _run(self) -> None:
        # Check once at once: the parent may have died before we started.
        while os.getppid() == self.parent_pid:
            if self._stop.wait(self.interval):
                return
        self.fired = True
        logger.error(
            "rank %d: the launcher process (pid %d) that started this worker has died; "
            "exiting so that the worker does not train on unsupervised",
            self.rank,
            self.parent_pid,
        )
        if self._on_parent_death is not None:
            self._on_parent_death(self.parent_pid)
            return
        terminate_self(self.grace)


def terminate_self(grace: float) -> None:
    """SIGTERM this process; ``os._exit`` after ``grace`` seconds if that did not end it."""
    for stream in (sys.stdout, sys.stderr):  # SIGTERM's default action loses buffered output
        with contextlib.suppress(Exception):
            stream.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Event().wait(grace)
    os._exit(EXIT_CODE)
