"""One directory per run: ``{run_dir}/{project}/{experiment}/{run_id}``, agreed by every rank."""

from __future__ import annotations

import datetime
import os
import secrets
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dream_trainer.configs import TrainerConfig

LATEST = "latest"
CONFIG_FILE = "config.json"


_ELASTIC_RUNS_IN_THIS_PROCESS: dict[str, int] = {}


def new_run_id(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """torchrun's run id when it names this job, else a UTC timestamp and a random suffix.

    torchrun keeps its run id across ``--max-restarts`` restarts, so a restarted job writes into
    the directory of the run it continues. A second run in the same process gets ``-2``
    appended (every rank counts its runs alike), so two runs of one job never share a directory.
    """
    env = os.environ if environ is None else environ
    elastic = env.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        count = _ELASTIC_RUNS_IN_THIS_PROCESS.get(elastic, 0) + 1
        _ELASTIC_RUNS_IN_THIS_PROCESS[elastic] = count
        return elastic if count == 1 else f"{elastic}-{count}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def agree_on_run_id(config: TrainerConfig, group: Any) -> str:
    """The configured run id, or one chosen on rank 0 and broadcast, so all ranks agree."""
    if config.run_id is not None:
        return config.run_id
    proposal = [new_run_id()]
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast_object_list(proposal, src=0, group=group)
    return str(proposal[0])


def experiment_dir(config: TrainerConfig) -> Path:
    """``{run_dir}/{project}/{experiment}``: the runs of one experiment, and its ``latest`` link."""
    return Path(config.run_dir) / config.project / config.experiment


def create_run_directory(config: TrainerConfig, run_id: str) -> Path:
    """Make the run's directory, write its resolved config and point ``latest`` at it."""
    parent = experiment_dir(config)
    path = parent / run_id
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _point_latest(parent, run_id)
    return path


def _point_latest(parent: Path, run_id: str) -> None:
    # Replace atomically, so a reader never sees a missing or half-written link.
    link = parent / LATEST
    tmp = parent / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_id, target_is_directory=True)
    except OSError:  # no symlinks here (some filesystems): a file naming the run instead
        tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, link)
