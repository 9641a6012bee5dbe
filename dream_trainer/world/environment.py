"""Where the ranks came from: plain python, torchrun, SLURM, or a process group made by someone else."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

LaunchSource = Literal["single", "torchrun", "slurm", "existing"]


@dataclass(frozen=True)
class LaunchEnvironment:
    """Rank facts of this process and how to reach the others."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: LaunchSource
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    supervised: bool = False
    """A launcher process supervises this one (torchrun's agent: ``TORCHELASTIC_RUN_ID`` is set),
    so the process must not outlive it; see :mod:`dream_trainer.world.parent_watch`."""

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
        """Read the launcher's variables; an initialized process group wins over all of them.

        ``RANK`` and ``WORLD_SIZE`` (> 1) without ``MASTER_ADDR`` or ``MASTER_PORT`` raise
        RuntimeError naming the missing variables.
        """
        env = os.environ if environ is None else environ
        local_rank = int(env.get("LOCAL_RANK", 0))
        if dist.is_available() and dist.is_initialized():
            return cls(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=local_rank,
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                source="existing",
            )
        if "RANK" in env and "WORLD_SIZE" in env:
            world_size = int(env["WORLD_SIZE"])
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
            if missing and world_size > 1:
                raise RuntimeError(_missing_master_message(env, missing))
            if missing:  # a world of one reaches nobody: no address needed, none invented
                return cls(
                    rank=0,
                    world_size=1,
                    local_rank=local_rank,
                    local_world_size=1,
                    source="single",
                )
            return cls(
                rank=int(env["RANK"]),
                world_size=world_size,
                local_rank=local_rank,
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                source="torchrun",
                master_addr=env["MASTER_ADDR"],
                master_port=int(env["MASTER_PORT"]),
                supervised="TORCHELASTIC_RUN_ID" in env,
            )
        if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
            return cls(
                rank=int(env["SLURM_PROCID"]),
                world_size=int(env["SLURM_NTASKS"]),
                local_rank=int(env.get("SLURM_LOCALID", 0)),
                local_world_size=_slurm_tasks_on_this_node(env),
                source="slurm",
                master_addr=env.get("MASTER_ADDR")
                or first_slurm_host(env.get("SLURM_JOB_NODELIST", "")),
                master_port=int(env.get("MASTER_PORT", 0)) or _slurm_port(env),
            )
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1, source="single")


def _missing_master_message(env: Mapping[str, str], missing: list[str]) -> str:
    names = " and ".join(missing)
    return (
        f"RANK={env['RANK']} and WORLD_SIZE={env['WORLD_SIZE']} are set but {names} "
        f"{'is' if len(missing) == 1 else 'are'} not, so this rank cannot find rank 0. Launch "
        "with `dream-trainer run SCRIPT ...` (or torchrun), which sets all of them, or export "
        f"{names} (the host and a free port of rank 0) on every rank"
    )


def visible_accelerators() -> tuple[str, int]:
    """The accelerator type this process sees and how many: ``("cuda", 8)``, or ``("cpu", 0)``.

    CUDA devices are counted with ``torch.cuda.device_count()``, which creates no CUDA context;
    other accelerators through ``torch.accelerator``.
    """
    cuda_count = torch.cuda.device_count()
    if cuda_count:
        return "cuda", cuda_count
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator()
        if kind is not None and kind.type != "cpu":
            return kind.type, int(accelerator.device_count())
    return "cpu", 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-010,012],cpu1`` (-> ``gpu003``)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(
            "cannot find the first host of SLURM_JOB_NODELIST="
            f"{nodelist!r}; set MASTER_ADDR to the host of rank 0"
        )
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3"; the local count is what this node runs.
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if per_node and per_node.isdigit():
        return int(per_node)
    first = env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0]
    return int(first.split("(")[0])


def _slurm_port(env: Mapping[str, str]) -> int:
    # Every task derives the same port from the job id, so no rendezvous is needed to agree on it.
    return 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
