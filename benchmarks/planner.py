"""Plan Llama 3 8B, 70B and 405B layouts at 64, 512 and 1024 ranks on the meta device and time
each; two impossible layouts show the planner's refusals.

    python -m benchmarks.planner            # every row (a few minutes on 2 CPU cores)
    python -m benchmarks.planner --only 8B  # the rows whose name contains 8B

Prints a markdown table (docs/scaling.md shows one): the layout, the worst rank's memory, the
verdict on 80 GiB devices and the seconds the plan took (set-up once per pipeline rank).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dream_trainer.launch import plan_layout
from dream_trainer.world.auto_layout import format_bytes

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "llama3" / "train.py"
BF16 = [
    "--device_parameters.param_dtype",
    "bfloat16",
    "--device_parameters.reduce_dtype",
    "float32",
]
AC = ["--device_parameters.checkpoint_activations", "true"]


def degrees(pp: int = 1, dpr: int = 1, dps: int = 1, cp: int = 1, tp: int = 1) -> list[str]:
    args = [
        "--device_parameters.pipeline_parallel", str(pp),
        "--device_parameters.dp_replicate", str(dpr),
        "--device_parameters.dp_shard", str(dps),
        "--device_parameters.context_parallel", str(cp),
        "--device_parameters.tensor_parallel", str(tp),
    ]  # fmt: skip
    if pp > 1:  # eight microbatches of one sequence each
        args += [
            "--batch_size",
            "8",
            "--device_parameters.pipeline_parallel_config.num_microbatches",
            "8",
        ]
    return args


ROWS: dict[str, tuple[str, int, list[str]]] = {
    "8B-64 FSDP": ("8B", 64, degrees(dps=64) + AC),
    "8B-512 HSDP": ("8B", 512, degrees(dpr=8, dps=64) + AC),
    "8B-1024 5-D": ("8B", 1024, degrees(pp=2, dpr=4, dps=32, cp=2, tp=2) + AC),
    "70B-64 FSDP x TP": ("70B", 64, degrees(dps=8, tp=8) + AC),
    "70B-512 PP x FSDP x TP": ("70B", 512, degrees(pp=4, dps=16, tp=8) + AC),
    "70B-1024 5-D": ("70B", 1024, degrees(pp=4, dpr=2, dps=8, cp=2, tp=8) + AC),
    "405B-64 PP x TP": ("405B", 64, degrees(pp=8, tp=8) + AC),
    "405B-512 PP x FSDP x TP": ("405B", 512, degrees(pp=8, dps=8, tp=8) + AC),
    "405B-1024 5-D": ("405B", 1024, degrees(pp=8, dpr=2, dps=4, cp=2, tp=8) + AC),
    "405B-1024 TP 16 (refused)": ("405B", 1024, degrees(pp=8, dps=8, tp=16) + AC),
    "405B-1024 product 512 (refused)": ("405B", 1024, degrees(pp=8, dps=8, tp=8) + AC),
}


def run_row(name: str) -> str:
    model, world, args = ROWS[name]
    started = time.perf_counter()
    try:
        plan = plan_layout(
            SCRIPT,
            script_args=["--config", model, *BF16, *args],
            world_size=world,
            devices_per_node=8,
            device_memory="80GiB",
        )
    except Exception as error:
        seconds = time.perf_counter() - started
        reason = str(error).split(";")[0]
        return f"| {name} | refused: {reason} | | {seconds:.1f} |"
    seconds = time.perf_counter() - started
    worst = plan.worst.memory
    verdict = "fits" if plan.fits else "does not fit"
    return f"| {name} | {format_bytes(worst.total)} on rank {plan.worst.ranks[0]} | {verdict} | {seconds:.1f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the rows whose name contains this")
    options = parser.parse_args(argv)
    print("| layout | worst rank | on 80 GiB | seconds |\n| --- | --- | --- | --- |", flush=True)
    for name in ROWS:
        if options.only in name:
            print(run_row(name), flush=True)


if __name__ == "__main__":
    main()
