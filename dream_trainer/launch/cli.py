"""The ``dream-trainer`` command (also ``python -m dream_trainer``)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from dream_trainer.launch.agent import DEFAULT_RDZV_ID, RunPlan, choose_nproc, run_agent
from dream_trainer.launch.plan_cli import add_plan_parser, run_plan, split_plan_argv

RUN_EXAMPLES = """\
examples:
  dream-trainer run examples/llama3/train.py --config debug
      one process per GPU of this machine (one CPU process without a GPU)
  dream-trainer run --nproc 4 train.py
      4 processes (on CPU: 4 CPU ranks)
  dream-trainer run --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 train.py
  dream-trainer run --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 train.py
      two machines, one agent each, meeting at port 29400 of node0

Everything after SCRIPT is passed to the script unchanged. Each run first prints how many
processes it starts and why, and the torchrun command it amounts to.
"""


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}")
    return int(value)


def _endpoint(value: str) -> str:
    if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", value):
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT (e.g. node0:29400), got {value!r}; HOST is node 0's name or "
            "address, PORT a free port on it"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dream-trainer`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dream-trainer",
        description="Launch Dream Trainer jobs.",
        epilog="`dream-trainer COMMAND --help` shows the options of a command.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="run a training script on every local device (or N CPU processes), on one node "
        "or many, through torchrun's elastic agent",
        description="Run SCRIPT once per device of this node under torchrun's elastic agent.\n"
        "On several nodes, start one `dream-trainer run` per node with the same --nnodes,\n"
        "--rdzv-endpoint and --rdzv-id; they meet there (c10d rendezvous) and start together.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    run.add_argument(
        "--nproc",
        type=_positive,
        metavar="N",
        help="processes on this node (default: one per visible GPU/accelerator, or 1 without)",
    )
    run.add_argument(
        "--nnodes",
        type=_positive,
        default=1,
        metavar="N",
        help="number of nodes (machines) in the job, each running one dream-trainer run "
        "(default: 1)",
    )
    run.add_argument(
        "--node-rank",
        type=_non_negative,
        metavar="R",
        help="this node's index, 0 to N-1. Node 0 hosts the rendezvous at --rdzv-endpoint; "
        "global ranks follow the order in which nodes join (default: torch decides which node "
        "hosts by matching HOST against this machine's names)",
    )
    run.add_argument(
        "--rdzv-endpoint",
        type=_endpoint,
        metavar="HOST:PORT",
        help="where the nodes meet: node 0's host name or address and a free TCP port on it "
        "(required with --nnodes > 1; on one node the default is a private rendezvous)",
    )
    run.add_argument(
        "--rdzv-id",
        default=DEFAULT_RDZV_ID,
        metavar="ID",
        help="job id, the same on every node; it also names the run directory, and a "
        "restart (--max-restarts) keeps it (default: none, as in torchrun: runs are named by "
        "their start time; under SLURM pass the job id)",
    )
    run.add_argument(
        "--max-restarts",
        type=_non_negative,
        default=0,
        metavar="N",
        help="restart all processes of the job up to N times after one fails; with "
        "checkpoints on, the restarted run resumes from the newest (default: 0)",
    )
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    run.add_argument(
        "script_args", metavar="ARGS", nargs=argparse.REMAINDER, help="arguments for SCRIPT"
    )
    add_plan_parser(commands)
    return parser


def _split_at_script(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[list[str], list[str]]:
    """``argv`` of ``run`` as (its own options + SCRIPT, the script's arguments untouched).

    argparse would drop a ``--`` meant for the script, so the script's arguments are cut off
    before parsing: SCRIPT is the first word that is neither an option nor an option's value.
    """
    takes_value = {
        option
        for action in parser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            return argv[:index] + argv[index + 1 : index + 2], argv[index + 2 :]
        if not word.startswith("-") or word == "-":
            return argv[: index + 1], argv[index + 1 :]
        index += 2 if word in takes_value else 1
    return argv, []


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dream-trainer``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    script_args: list[str] = []
    if argv and argv[0] == "run":
        own, script_args = _split_at_script(_subparser(parser, "run"), argv[1:])
        argv = ["run", *own]
    elif argv and argv[0] == "plan":
        own, script_args = split_plan_argv(argv[1:])
        argv = ["plan", *own]
    options = parser.parse_args(argv)
    if options.command == "run":
        return _run(options, script_args, _subparser(parser, "run"))
    if options.command == "plan":
        return run_plan(options, script_args)
    parser.error(f"unknown command {options.command!r}")  # pragma: no cover - argparse checks
    return 2  # pragma: no cover


def _run(
    options: argparse.Namespace, script_args: list[str], parser: argparse.ArgumentParser
) -> int:
    if options.nnodes > 1 and options.rdzv_endpoint is None:
        parser.error(
            f"--nnodes {options.nnodes} needs --rdzv-endpoint HOST:PORT, the address of node 0 "
            "where all nodes meet (the same on every node)"
        )
    if options.node_rank is not None and options.node_rank >= options.nnodes:
        parser.error(
            f"--node-rank {options.node_rank} is out of range for --nnodes {options.nnodes}; "
            f"give 0 to {options.nnodes - 1}"
        )
    if not Path(options.script).is_file():
        parser.error(
            f"SCRIPT {options.script!r} is not a file; give the path of the Python script to "
            "run, before its own arguments"
        )
    nproc, reason = choose_nproc(options.nproc)
    plan = RunPlan(
        script=options.script,
        script_args=tuple(script_args),
        nproc=nproc,
        nnodes=options.nnodes,
        node_rank=options.node_rank,
        rdzv_endpoint=options.rdzv_endpoint,
        rdzv_id=options.rdzv_id,
        max_restarts=options.max_restarts,
    )
    where = "this node" if plan.nnodes == 1 else f"this node (one of {plan.nnodes})"
    print(
        f"dream-trainer run: {nproc} process{'es' if nproc > 1 else ''} on {where}: {reason}\n"
        f"dream-trainer run: torchrun {shlex.join(plan.torchrun_args())}",
        file=sys.stderr,
        flush=True,
    )
    return run_agent(plan)
