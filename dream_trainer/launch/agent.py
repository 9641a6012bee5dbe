"""torchrun's elastic agent, started in this process with an argument list built for the user."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

DEFAULT_RDZV_ID = "none"
"""The rendezvous id when ``--rdzv-id`` is not given: torchrun's default, which the trainer does
not use as a run id (runs are then named by their start time)."""


@dataclass(frozen=True)
class RunPlan:
    """What ``dream-trainer run`` starts on this node."""

    script: str
    script_args: tuple[str, ...] = ()
    nproc: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    """This node's index; 0 hosts the rendezvous store. ``None``: torch decides by hostname."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the rendezvous (node 0); ``None`` on one node runs standalone."""
    rdzv_id: str = DEFAULT_RDZV_ID
    max_restarts: int = 0

    def torchrun_args(self) -> list[str]:
        """The torchrun (``torch.distributed.run``) argument list that runs this plan."""
        args = [
            _flag("--nnodes"),
            str(self.nnodes),
            _flag("--nproc-per-node"),
            str(self.nproc),
            _flag("--max-restarts"),
            str(self.max_restarts),
        ]
        if self.rdzv_endpoint is None:
            args.append(_flag("--standalone"))
        else:
            args += [_flag("--rdzv-backend"), "c10d", _flag("--rdzv-endpoint"), self.rdzv_endpoint]
            args += [_flag("--rdzv-id"), self.rdzv_id]
            if self.node_rank is not None:
                # Node 0 hosts the rendezvous store; saying so spares torch guessing it from
                # the host name (wrong on machines with several names or interfaces). Global
                # ranks still follow the order in which the nodes join.
                is_host = int(self.node_rank == 0)
                args += [_flag("--rdzv-conf"), f"is_host={is_host}"]
        return [*args, self.script, *self.script_args]


def choose_nproc(requested: int | None) -> tuple[int, str]:
    """Processes to start on this node and why: ``requested``, else one per accelerator, else 1."""
    # Imported here so that `dream-trainer --help` answers without importing torch.
    from dream_trainer.world.environment import visible_accelerators

    kind, count = visible_accelerators()
    if requested is not None:
        reason = f"--nproc {requested}"
        if count and requested > count:
            reason += (
                f"; only {count} {kind} device(s) are visible, so local ranks {count} and up have "
                "none of their own unless the script passes device='cpu' to the trainer"
            )
        return requested, reason
    if count:
        return count, f"one per visible {kind} device"
    return 1, "no accelerator is visible, so one CPU process; pass --nproc N for N processes"


def _flag(name: str) -> str:
    """``name`` as this torch's torchrun spells it (dashes, or the older underscores)."""
    known = _torchrun_options()
    for spelling in (name, "--" + name[2:].replace("-", "_")):
        if spelling in known:
            return spelling
    import torch

    raise RuntimeError(
        f"torchrun in torch {torch.__version__} has no option {name}; dream-trainer run needs "
        "torch 2.11 to 2.15"
    )


def _torchrun_options() -> set[str]:
    from torch.distributed import run as torchrun

    return set(torchrun.get_args_parser()._option_string_actions)


def run_agent(plan: RunPlan) -> int:
    """Run ``plan`` under torchrun's agent in this process; returns the job's exit code.

    The code is that of the first rank that failed (128 + N for a rank killed by signal N),
    or 128 + N when the agent itself received signal N; 0 when every rank succeeded.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    if plan.nproc > 1:
        # torchrun sets it too, with a banner; one thread per process keeps N ranks from
        # oversubscribing the cores. One process keeps torch's default (all cores).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        _call_torchrun(torchrun, plan)
    except ChildFailedError as error:
        print(str(error), file=sys.stderr, flush=True)
        _, failure = error.get_first_failure()
        return _exit_code(failure.exitcode)
    except SignalException as error:
        print(f"dream-trainer run: stopped by {error.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    except RendezvousError as error:
        where = plan.rdzv_endpoint or "this node (standalone)"
        message = f"dream-trainer run: the rendezvous at {where} failed ({error})"
        if plan.rdzv_endpoint is not None:
            message += (
                f"; every node must run dream-trainer run with the same --nnodes {plan.nnodes}, "
                "--rdzv-endpoint and --rdzv-id, and HOST:PORT must be reachable from all of them"
            )
        print(message, file=sys.stderr, flush=True)
        return 1
    return 0


def _call_torchrun(torchrun: Any, plan: RunPlan) -> None:
    # torchrun's own parser would drop a "--" among the script's arguments, so it parses the
    # options and the script only and the arguments are put in as given. record() is what the
    # torchrun command wraps around run(): it passes a rank's error file on to a scheduler.
    from torch.distributed.elastic.multiprocessing.errors import record

    options = torchrun.parse_args(plan.torchrun_args()[: -len(plan.script_args) or None])
    if not isinstance(getattr(options, "training_script_args", None), list):
        import torch

        raise RuntimeError(
            f"torchrun in torch {torch.__version__} parses no training_script_args; "
            "dream-trainer run needs torch 2.11 to 2.15"
        )
    options.training_script_args = list(plan.script_args)
    record(torchrun.run)(options)


def _exit_code(code: int) -> int:
    if code < 0:  # killed by a signal, as the shell reports it
        return 128 - code
    return code if code else 1  # a failure reported with code 0 is still a failure
