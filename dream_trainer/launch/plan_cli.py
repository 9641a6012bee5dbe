"""``dream-trainer plan``: size a training script's run for a cluster before renting it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

PLAN_EXAMPLES = """\
examples:
  dream-trainer plan examples/llama3/train.py --config 8B --world-size 64
      every rank's memory for 8 nodes of 8 devices of 80 GiB, under the script's own layout
  dream-trainer plan examples/llama3/train.py --config 405B \\
      --device_parameters.tensor_parallel 8 --device_parameters.pipeline_parallel 8 \\
      --world-size 1024 --device-memory 141GB
  dream-trainer plan examples/llama3/train.py --config 70B --world-size 512 --suggest
      also rank the layouts that fit, least communication first

The planner's own options may come before SCRIPT or among its arguments; everything else after
SCRIPT goes to the script, as does everything after `--` (to pass it an option of the same
name). Exit code: 0 when the worst rank fits, 1 when it does not, 2 when the layout is refused
(with --suggest: 0 when some layout fits).
"""

_OWN = {"--world-size", "--devices-per-node", "--device-memory", "--suggest"}
DEFAULT_SUGGESTIONS = 3


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def add_plan_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``commands`` (argparse subparsers)."""
    plan = commands.add_parser(
        "plan",
        help="set a training script's trainer up on the meta device for a cluster of N ranks "
        "and report every rank's memory against the device memory (nothing is allocated)",
        description="Build SCRIPT's trainer as `python SCRIPT ARGS...` would, stop at its fit(),\n"
        "and set it up for --world-size ranks on the meta device with a fake process group:\n"
        "the same checks as a real launch, then each rank's parameters, gradients, optimizer\n"
        "state, gathered FSDP units and activations (docs/scaling.md).",
        epilog=PLAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    plan.add_argument(
        "--world-size", type=_positive, required=True, metavar="N", help="ranks of the run"
    )
    plan.add_argument(
        "--devices-per-node",
        type=_positive,
        default=8,
        metavar="D",
        help="ranks (devices) per node; tensor parallelism stays within one (default: 8)",
    )
    plan.add_argument(
        "--device-memory",
        default="80GiB",
        metavar="SIZE",
        help="memory of one device, e.g. 80GiB or 141GB (default: 80GiB)",
    )
    plan.add_argument(
        "--suggest",
        type=_positive,
        nargs="?",
        const=DEFAULT_SUGGESTIONS,
        metavar="K",
        help=f"also plan candidate layouts, least communication first, until K fit (default "
        f"{DEFAULT_SUGGESTIONS})",
    )
    plan.add_argument("script", metavar="SCRIPT", help="the training script")
    plan.add_argument(
        "script_args", metavar="ARGS", nargs=argparse.REMAINDER, help="arguments for SCRIPT"
    )
    return plan


def split_plan_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``plan``'s argv as (its own options then SCRIPT, the script's arguments).

    Before SCRIPT every word is the planner's; after it, the planner's own options (and their
    values) are taken out wherever they are, until a ``--`` that hands the rest to the script.
    """
    own: list[str] = []
    rest: list[str] = []
    index, script = 0, None
    while index < len(argv):
        word = argv[index]
        index += 1
        if script is not None and word == "--":
            rest += argv[index:]
            break
        if word == "--" and script is None:
            if index < len(argv):
                script = argv[index]
                index += 1
            continue
        name = word.split("=", 1)[0]
        if name in _OWN:
            value_follows = "=" not in word and index < len(argv)
            if word == "--suggest" and not (value_follows and argv[index].isdigit()):
                word = f"--suggest={DEFAULT_SUGGESTIONS}"  # else argparse takes SCRIPT for K
                value_follows = False
            own.append(word)
            if value_follows:
                own.append(argv[index])
                index += 1
        elif script is None and not word.startswith("-"):
            script = word
        elif script is None:
            own.append(word)  # an unknown option before SCRIPT: argparse names it
        else:
            rest.append(word)
    return own + ([script] if script is not None else []), rest


def run_plan(options: argparse.Namespace, script_args: list[str]) -> int:
    """Plan (and with ``--suggest`` rank layouts); print the report; return the exit code."""
    from dream_trainer.launch.plan_report import parse_bytes
    from dream_trainer.launch.planner import load_trainer, plan_loaded, ranks_per_node
    from dream_trainer.launch.suggest import suggest_layouts

    try:
        memory = parse_bytes(options.device_memory)
        per_node = ranks_per_node(options.world_size, options.devices_per_node)
        trainer = load_trainer(options.script, script_args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"dream-trainer plan: error: {error}", file=sys.stderr)
        return 2
    source = " ".join([options.script, *script_args])
    code = 2
    try:
        plan = plan_loaded(trainer, options.world_size, per_node, memory, None, source)
    except Exception as error:  # what a launch would raise at set-up: report, then suggest
        print(f"dream-trainer plan: refused: {type(error).__name__}: {error}", file=sys.stderr)
    else:
        print(plan.describe(), flush=True)
        code = 0 if plan.fits else 1
    if options.suggest is None:
        return code
    tried = suggest_layouts(
        trainer,
        world_size=options.world_size,
        devices_per_node=per_node,
        device_memory=memory,
        limit=options.suggest,
    )
    print(_describe_suggestions(tried, options.world_size))
    return 0 if any(s.fits for s in tried) else 1


def _describe_suggestions(tried: list[Any], world_size: int) -> str:
    fitting = [s for s in tried if s.fits]
    lines = [f"\nlayouts of {world_size} ranks that fit, least communication first:"]
    lines += [f"{n:>3}. {s.describe()}" for n, s in enumerate(fitting, 1)]
    if not fitting:
        lines.append("  none; plan more ranks, or devices with more memory")
    planned = [s for s in tried if s.plan is not None and not s.fits]
    refused = [s for s in tried if s.refused]
    skipped = [s for s in tried if s.skipped]
    if planned:
        lines.append("planned, but too large:")
        lines += [f"     {s.describe()}" for s in planned[:5]]
    if refused:
        lines.append(f"refused by the set-up ({len(refused)}; first 5):")
        lines += [f"     {s.describe().splitlines()[0][:200]}" for s in refused[:5]]
    if skipped:
        lines.append(
            f"skipped {len(skipped)} whose parameters, gradients and optimizer state alone "
            "exceed the device memory"
        )
    return "\n".join(lines)
