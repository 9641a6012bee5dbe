"""Running one benchmark job on fresh CPU ranks (gloo, one thread each) and collecting results.

Each rank calls ``train(job, rank)`` and writes what it returns as JSON; the launcher gives
back every rank's result, or a one-line reason there is none (a timeout, a rank that raised or
exited). Shared by benchmarks/pipeline.py and benchmarks/context_parallel.py.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dream_trainer.world.process_groups import let_gloo_workers_settle

Train = Callable[[Any, int], dict[str, Any]]


def _rank_main(
    rank: int,
    train: Train,
    prepare: Callable[[], None],
    job: Any,
    ranks: int,
    port: int,
    out_dir: str,
) -> None:
    torch.set_num_threads(1)
    prepare()
    if ranks > 1:
        os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks
        )
    try:
        result = train(job, rank)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            # As DistributedWorld does for its own groups: a barrier, then a moment for gloo's
            # worker threads to finish, or the exit can abort ("terminate called ...").
            dist.barrier()
            dist.destroy_process_group()
            let_gloo_workers_settle()


def launch(
    train: Train,
    prepare: Callable[[], None],
    job: Any,
    ranks: int,
    timeout: float,
    prefix: str,
) -> list[dict[str, Any]] | str:
    """Run ``train(job, rank)`` on ``ranks`` fresh processes; the per-rank results, or why there
    are none. ``prepare`` runs first in each process (e.g. to quiet logging)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as out_dir:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the spawned ranks before torch starts
        try:
            context = mp.start_processes(
                _rank_main,
                args=(train, prepare, job, ranks, port, out_dir),
                nprocs=ranks,
                join=False,
                start_method="spawn",
            )
        finally:
            if threads is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = threads
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                    for process in context.processes:
                        process.join()
                    return f"timed out after {timeout:.0f} s"
        except mp.ProcessRaisedException as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            return f"rank {error.error_index} raised {lines[-1].strip()}"
        except mp.ProcessExitedException as error:
            return f"rank {error.error_index} exited with code {error.exit_code}"
        results = []
        for rank in range(ranks):
            path = Path(out_dir, f"rank{rank}.json")
            if not path.exists():
                return f"rank {rank} wrote no result"
            results.append(json.loads(path.read_text()))
        return results
