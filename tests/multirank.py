"""Run test functions on several CPU ranks (gloo) from inside pytest.

Why a pool: starting a rank costs seconds, almost all of it importing torch. Measured on the
2-core dev machine (best runs; other jobs shared it and often doubled these): a pool of 2
*spawned* ranks is ready in ~1.2-2.8 s, 4 ranks in ~5 s, 8 ranks in ~9.5 s, while a call on a
warm pool with a tiny function takes ~0.25 ms (2 ranks), ~0.6 ms (4), ~1.1 ms (8). So each world
size gets one persistent pool with the default process group already initialized, reused by
every test of the pytest session. Restoring process-group state after a call that changed it
costs ~30-50 ms (4 ranks).

Why a fork server: on Linux, ranks are forked by multiprocessing's fork server, which imports
torch once (with OMP_NUM_THREADS=1, as a spawned rank does) and has never run any torch code, so
every rank starts as a new process with torch already imported: a pool of 4 is ready in ~0.1 s
and one of 8 in ~0.2 s instead of ~5 and ~10 s (the first pool of a session also starts the
server, ~2-4 s, like one spawned start). That makes the pools rebuilt after failures and
``run_with_fresh_ranks`` cheap too. Each rank gets the environment of the process that started
the pool, as a spawned one would. A fresh-ranks ``env`` naming a variable that torch or its
thread libraries read at import (``TORCH*`` but ``TORCHELASTIC_*``, ``OMP_*``, ...) gets spawned
processes instead, which see it before importing torch; so do other platforms, and every pool
when DREAM_TESTS_SPAWN_RANKS=1 (to tell a fork-server problem from a test's).

Design:

* ``run_on_ranks`` pickles ``fn`` by reference (it must be importable by qualified name), sends it
  to every rank over a pipe and collects return values; failures raise ``MultiRankError``.
  ``timeout`` (and ``env`` for ``run_with_fresh_ranks``) are the harness's, never passed to fn.
* ``run_with_fresh_ranks`` starts new processes per call, with torchrun-like env vars but no
  process group, for code that creates one itself; ``run_torchrun`` runs a script end to end.
* A rank still running at ``timeout`` (or 5 s after another rank failed, since it is then almost
  always waiting for that rank in a collective) gets its Python stack dumped via ``faulthandler``
  on SIGUSR1 into the error, and the whole pool is killed. Any failure kills the pool (a
  surviving rank may hold half-finished collectives); the next call starts a fresh one.
* After each call every rank restores the default dtype (float32), grad mode, default device,
  environment variables and working directory. Process groups created by the function are
  destroyed; a default group destroyed or replaced by the function is re-created. The RNG is NOT
  reset: every function must seed itself.
* Ranks ignore SIGINT, exit when their pipe closes or when the process that started them dies
  (they watch multiprocessing's parent sentinel: a forked rank's OS parent is the fork server),
  and pools are shut down at interpreter exit and at the end of the pytest session (see
  ``tests/conftest.py``).
* Rank stdout/stderr is inherited from the pytest process (as it was when the fork server, or a
  spawned pool, started), so pytest does not capture prints of later tests; rely on return
  values and raised errors instead.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing as mp
import multiprocessing.forkserver
import multiprocessing.util  # its atexit hook joins children: import it first so ours runs first
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

PG_TIMEOUT_S = 120.0  # gloo op timeout: a crashed peer surfaces as an error, not a hang
START_TIMEOUT_S = 300.0  # 8 ranks take ~9 s on 2 cores; leave room for a loaded CI machine
RESTORE_TIMEOUT_S = 60.0
FAILURE_GRACE_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent
_RDZV_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
# What the fork server imports before it forks any rank: torch modules most tests use (the
# tensor package brings dynamo), nothing of dream_trainer. With OMP_NUM_THREADS=1 the server has
# a single thread, so forking it is safe.
_PRELOAD = [
    "pytest",
    "tests.multirank",
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
]
# Prefixes of variables read when torch (or OpenMP, MKL, the loader) is imported.
_IMPORT_TIME_ENV = (
    "TORCH",
    "PYTORCH",
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "LD_",
    "PYTHON",
)
_forkserver_ready = False


class MultiRankError(Exception):
    """One or more ranks failed; ``failures`` maps rank -> traceback or diagnosis text."""

    def __init__(self, what: str, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        parts = [f"{len(failures)} rank(s) failed in {what}: ranks {list(self.failures)}"]
        for rank, text in self.failures.items():
            parts.append(f"\n========== rank {rank} ==========\n{text.rstrip()}")
        super().__init__("\n".join(parts))


def _watch_parent() -> None:
    # A rank blocked in a collective never reads its pipe, so watch the parent as well: its
    # sentinel (a pipe the parent holds open) is readable once the parent has died.
    parent = mp.parent_process()
    if parent is not None:
        parent.join()
    os._exit(3)


def _context(env: dict[str, str] | None) -> Any:
    """The fork server (started once, torch preloaded) on Linux; spawn elsewhere, or when ``env``
    sets a variable that must be in place before torch is imported."""
    global _forkserver_ready
    import_time = [k for k in env or {} if k.startswith(_IMPORT_TIME_ENV)]
    spawn_only = sys.platform != "linux" or os.environ.get("DREAM_TESTS_SPAWN_RANKS") == "1"
    if spawn_only or any(not k.startswith("TORCHELASTIC_") for k in import_time):
        return mp.get_context("spawn")
    if not _forkserver_ready:
        mp.set_forkserver_preload(_PRELOAD)
        _forkserver_ready = True
    # Started here (or restarted, if it died) rather than by the first fork, to set its
    # OMP_NUM_THREADS, which OpenMP reads when the server imports torch.
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return mp.get_context("forkserver")


def _extra_groups(dist: Any) -> list[Any]:
    """Process groups other than the default one (private registry; empty if it is missing)."""
    pg_map = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)
    if pg_map is None or not dist.is_initialized():
        return []
    return [pg for pg in list(pg_map) if pg is not dist.group.WORLD]


def _receive(conn: Connection) -> tuple[Any, ...]:
    try:
        return conn.recv()  # type: ignore[no-any-return]
    except EOFError:  # the parent closed the pipe or died
        return ("exit",)


def _worker_main(rank: int, world_size: int, conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of one rank: set the torchrun-like env (before importing torch, unless the
    fork server already did, with the same OMP_NUM_THREADS), then serve."""
    if "parent_env" in cfg:  # a forked rank has the fork server's environment: take the pool's
        os.environ.clear()
        os.environ.update(cfg["parent_env"])
    os.environ.update(cfg["env"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    # Relative paths a test writes (a trainer's default run_dir "runs") land in the pool's
    # temporary directory, not in the checkout.
    os.chdir(cfg["cwd"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns our lifetime
    threading.Thread(target=_watch_parent, daemon=True).start()
    if hasattr(signal, "SIGUSR1"):
        stack_file = open(Path(cfg["dir"]) / f"rank{rank}.stack", "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)

    def init_pg(store_path: str) -> Any:
        store, t = dist.FileStore(store_path, world_size), timedelta(seconds=PG_TIMEOUT_S)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=t)
        return dist.group.WORLD

    try:
        own_pg = init_pg(cfg["store"]) if cfg["store"] else None
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    base_env, base_cwd = dict(os.environ), os.getcwd()
    while (msg := _receive(conn))[0] != "exit":
        try:
            if msg[0] == "run":
                fn, args, kwargs = pickle.loads(msg[1])
                reply: tuple[Any, ...] = ("ok", pickle.dumps(fn(*args, **kwargs)))
            else:  # "restore": drop groups the function created; re-create the default if asked
                if msg[1] is None:
                    dist.barrier()  # every rank is done with its subgroups before any closes them
                    for pg in _extra_groups(dist):
                        dist.destroy_process_group(pg)
                else:
                    if dist.is_initialized():
                        dist.destroy_process_group()
                    own_pg = init_pg(msg[1])
                reply = ("ok", None)
        except BaseException:
            reply = ("err", traceback.format_exc())
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        if hasattr(torch, "set_default_device"):
            torch.set_default_device(None)
        if os.environ != base_env:
            os.environ.clear()
            os.environ.update(base_env)
        os.chdir(base_cwd)
        pg_ok = own_pg is not None and dist.is_initialized() and dist.group.WORLD is own_pg
        conn.send((*reply, {"pg_ok": pg_ok, "extra": len(_extra_groups(dist))}))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown with torch loaded: it costs ~1 s per rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its pipe but is still running"
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class _Pool:
    """``world_size`` spawned ranks, optionally with an initialized gloo default group."""

    def __init__(self, world_size: int, init_pg: bool, env: dict[str, str] | None = None) -> None:
        self.world_size, self.init_pg, self.closed = world_size, init_pg, False
        self.dir = tempfile.mkdtemp(prefix=f"multirank{world_size}-")
        self.generation = 0
        env_vars = dict(OMP_NUM_THREADS="1", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
        env_vars.update(
            LOCAL_WORLD_SIZE=str(world_size), MASTER_PORT=str(_free_port()), **(env or {})
        )
        store = self._store_path() if init_pg else None
        cwd = os.path.join(self.dir, "cwd")
        os.makedirs(cwd)
        cfg = {
            "env": env_vars,
            "parent_env": dict(os.environ),
            "dir": self.dir,
            "cwd": cwd,
            "store": store,
        }
        ctx = _context(env)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for rank in range(world_size):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(rank, world_size, theirs, cfg))
                proc.start()
                theirs.close()
                self.conns.append(ours)
                self.procs.append(proc)
            _, failures = self._gather(START_TIMEOUT_S)
            if failures:
                raise MultiRankError(f"starting {world_size} ranks", failures)
        except BaseException:
            self.kill()
            raise

    def _store_path(self) -> str:
        self.generation += 1
        return os.path.join(self.dir, f"store{self.generation}")

    def alive(self) -> bool:
        return not self.closed and all(proc.is_alive() for proc in self.procs)

    def run(self, payload: bytes, what: str, timeout: float) -> list[Any]:
        """Run one pickled task on every rank; kill the pool on any failure."""
        try:
            for conn in self.conns:
                conn.send(("run", payload))
            replies, failures = self._gather(timeout)
            results: list[Any] = []
            for rank in sorted(replies):
                try:
                    results.append(pickle.loads(replies[rank][1]))
                except Exception:
                    failures[rank] = f"unpicklable return value:\n{traceback.format_exc()}"
            if failures:
                raise MultiRankError(what, failures)
            if self.init_pg:
                self._restore([reply[2] for reply in replies.values()], what)
            return results
        except BaseException:
            self.kill()
            raise

    def _restore(self, states: list[dict[str, Any]], what: str) -> None:
        if not all(state["pg_ok"] for state in states):
            store: str | None = self._store_path()
        elif any(state["extra"] for state in states):
            store = None
        else:
            return
        for conn in self.conns:
            conn.send(("restore", store))
        _, failures = self._gather(RESTORE_TIMEOUT_S)
        if failures:
            raise MultiRankError(f"restoring the process group after {what}", failures)

    def _gather(self, timeout: float) -> tuple[dict[int, Any], dict[int, str]]:
        """One reply per rank; dead, failed and (after the deadline) stuck ranks become failures."""
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        failures: dict[int, str] = {}
        pending = set(range(self.world_size))
        grace = False
        while pending and time.monotonic() < deadline:
            owners: dict[Any, int] = {self.conns[rank]: rank for rank in pending}
            owners.update({self.procs[rank].sentinel: rank for rank in pending})
            for ready in wait(list(owners), timeout=max(0.0, deadline - time.monotonic())):
                rank = owners[ready]
                if rank not in pending:
                    continue
                pending.discard(rank)
                try:
                    msg = self.conns[rank].recv() if self.conns[rank].poll() else None
                except (EOFError, OSError):
                    msg = None
                if msg is None:
                    self.procs[rank].join(1.0)
                    exit_text = _describe_exit(self.procs[rank].exitcode)
                    failures[rank] = f"rank process {self.procs[rank].pid} {exit_text}"
                elif msg[0] == "err":
                    failures[rank] = msg[1]
                else:
                    replies[rank] = msg
            if failures and pending and not grace:
                grace = True
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        if pending:
            stacks = self._dump_stacks(sorted(pending))
            why = f"timed out: did not finish within {timeout:g} s"
            if grace:  # the usual cause: it waits for a failed rank in a collective
                why = f"still running {FAILURE_GRACE_S:g} s after rank(s) {sorted(failures)} failed"
            for rank in pending:
                failures[rank] = f"{why}; its Python stacks when it was killed:\n{stacks[rank]}"
        return replies, failures

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        if not hasattr(signal, "SIGUSR1"):
            return dict.fromkeys(ranks, "(stack dumps need SIGUSR1)")
        files = {rank: Path(self.dir) / f"rank{rank}.stack" for rank in ranks}
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not all(map(_nonempty, files.values())):
            time.sleep(0.05)
        time.sleep(0.2)  # a dump that has started is written in well under this
        texts = {r: f.read_text(errors="replace") if f.exists() else "" for r, f in files.items()}
        return {r: text or "(no stack dump was written)" for r, text in texts.items()}

    def shutdown(self) -> None:
        """Ask every rank to exit, then kill whatever is still running."""
        if self.closed:
            return
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit",))
        end = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5.0)
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_POOLS: dict[int, _Pool] = {}


def _task(fn: Callable[..., Any], world_size: int, timeout: float, *call: Any) -> tuple[bytes, str]:
    """Validate a call and pickle ``(fn, args, kwargs)``; also return a label for errors."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(
            f"fn={module}.{qualname} cannot be sent to the ranks: it must be a module-level "
            "function importable by qualified name; define it at module level of a test or "
            "source module."
        )
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be a positive number of seconds.")
    return pickle.dumps((fn, *call)), f"{module}.{qualname} on {world_size} ranks"


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of the gloo pool; return values indexed by rank."""
    payload, what = _task(fn, world_size, timeout, args, kwargs)
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()  # a rank died between calls
        pool = _POOLS[world_size] = _Pool(world_size, init_pg=True)
    return pool.run(payload, what, timeout)


def run_with_fresh_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Like ``run_on_ranks``, but in new processes with torchrun env vars and no process group."""
    payload, what = _task(fn, world_size, timeout, args, kwargs)
    pool = _Pool(world_size, init_pg=False, env=env)
    try:
        return pool.run(payload, f"{what} (fresh processes)", timeout)
    finally:
        pool.shutdown()


def shutdown_pools() -> None:
    """Stop every pool (registered with atexit after multiprocessing's hook, so it runs first)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown()


atexit.register(shutdown_pools)


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _kill_tree(root: int) -> None:
    """SIGKILL ``root`` and the process groups of its descendants (found via Linux /proc)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:  # breadth-first: the list grows while we walk it
        tree += [child for child, parent in parent_of.items() if parent == pid]
    for pid in tree:  # torchrun starts each worker in its own session, so kill group by group
        with contextlib.suppress(OSError):
            if os.getpgid(pid) != os.getpgrp():
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def run_torchrun(
    script_or_module_args: list[str],
    nproc: int,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N ARGS`` and capture it.

    OMP_NUM_THREADS=1 and the repo root on PYTHONPATH. Raises AssertionError with the output tails
    on a non-zero exit or on timeout (then torchrun, its workers and their children are killed).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", *script_or_module_args]
    full_env = {k: v for k, v in os.environ.items() if k not in _RDZV_VARS}
    python_path = [str(REPO_ROOT), *filter(None, [full_env.get("PYTHONPATH")])]
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(python_path), **(env or {}))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        try:
            out, err = proc.communicate(timeout=10.0)
        except subprocess.TimeoutExpired:  # a process we could not find still holds the pipes
            out, err = "", ""
        problem = f"timed out after {timeout:g} s (killed)"
    else:
        if proc.returncode == 0:
            return subprocess.CompletedProcess(cmd, 0, out, err)
        problem = f"exited with code {proc.returncode}"
    raise AssertionError(
        f"torchrun {' '.join(script_or_module_args)} on {nproc} ranks {problem}\n"
        f"----- stdout tail -----\n{_tail(out)}\n----- stderr tail -----\n{_tail(err)}"
    )
