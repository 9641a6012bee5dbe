"""Items per second of data-parallel inference on 1, 2 and 4 ranks, measured in one run.

    python examples/data_parallel/throughput.py [--ranks 1 2 4] [--items 2048] [--force-cpu]
    python examples/data_parallel/throughput.py --smoke     # tiny and quick: 1 and 2 ranks

The script launches itself once per rank count through ``dream-trainer run``'s launcher
(torchrun's elastic agent, run in this process, standalone), one thread per process
(``OMP_NUM_THREADS=1``), on the GPUs when there are enough of them, else on the CPU. Every rank builds the same :class:`TinyLM` and
``distributed_map`` splits ``--items`` token sequences over the ranks; each item is one
forward over ``--seq`` tokens, in calls of ``--batch-size`` items. Timed on rank 0: from a
barrier after an untimed warm-up call until every result is back, so start-up and model
building are left out. Ratios are to the 1-rank row. ``--repeats`` runs the rank counts again
in reverse order, alternating, and shows the median. The 1-minute load average at the start
of each launch is printed beside its row: other work on the machine slows every row it
overlaps. With more ranks than cores (or GPUs) a row measures the machine, not the method.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.data_parallel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from dream_trainer.configs import DeviceParameters
from dream_trainer.inference import distributed_map, even_split
from dream_trainer.world import DistributedWorld
from examples.data_parallel.models import TinyLM

VOCAB = 256
SMOKE = {"ranks": [1, 2], "items": 16, "dim": 16, "layers": 1, "seq": 8, "batch_size": 4}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="throughput.py", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], metavar="N")
    parser.add_argument("--items", type=int, default=2048, help="sequences to score (2048)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per call (8)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per item (64)")
    parser.add_argument("--dim", type=int, default=128, help="model width (128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each rank count (1)")
    parser.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on 1 and 2 ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- one launch


def worker(options: argparse.Namespace) -> None:
    """One rank of one launch; a rank that fails leaves its error next to the result file."""
    try:
        measure(options)
    except BaseException as error:
        rank = os.environ.get("RANK", "0")
        note = Path(options.result).with_name(f"error.rank{rank}")
        note.write_text(f"rank {rank}: {type(error).__name__}: {error}")
        raise


def measure(options: argparse.Namespace) -> None:
    """Score the items with ``distributed_map``; rank 0 writes the time it took."""
    cuda = torch.cuda.is_available() and not options.force_cpu
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    with DistributedWorld(DeviceParameters.DDP(), device=device) as world:
        torch.manual_seed(0)
        model = TinyLM(VOCAB, options.dim, options.layers, heads=4 if options.dim % 4 == 0 else 1)
        model = model.to(device).eval()
        g = torch.Generator().manual_seed(1)
        items = [torch.randint(0, VOCAB, (options.seq,), generator=g) for _ in range(options.items)]

        def score(batch: list[torch.Tensor]) -> list[int]:
            with torch.no_grad():
                logits = model(torch.stack(batch).to(device))
            return logits[:, -1].argmax(-1).tolist()  # the predicted next token of each item

        warmup = items[: world.dp_size * options.batch_size]
        distributed_map(score, warmup, batch_size=options.batch_size, world=world)
        dist.barrier(group=world.cpu_group)
        start = time.perf_counter()
        results = distributed_map(score, items, batch_size=options.batch_size, world=world)
        seconds = time.perf_counter() - start
        if world.is_global_zero:
            assert results is not None and len(results) == options.items
            record = {"seconds": seconds, "device": str(device), "backend": dist.get_backend()}
            Path(options.result).write_text(json.dumps(record))


def launch(options: argparse.Namespace, ranks: int) -> dict[str, Any] | str:
    """Run this script's worker on ``ranks`` processes; its record, or why there is none.

    The launcher is ``dream-trainer run``'s: torchrun's elastic agent, in this process.
    """
    from dream_trainer.launch import RunPlan, run_agent

    with tempfile.TemporaryDirectory(prefix="dp-throughput-") as tmp:
        result = Path(tmp, "result.json")
        sizes = ["--items", options.items, "--batch-size", options.batch_size, "--seq", options.seq]
        sizes += ["--dim", options.dim, "--layers", options.layers]
        args = ["--worker", "--result", str(result), *map(str, sizes)]
        args += ["--force-cpu"] if options.force_cpu else []
        plan = RunPlan(script=str(Path(__file__).resolve()), script_args=tuple(args), nproc=ranks)
        # One thread per rank for every rank count, 1 included, so the rows compare ranks.
        threads = os.environ.get("OMP_NUM_THREADS")
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            code = run_agent(plan)
        finally:
            for number, handler in handlers.items():  # the agent installs its own
                signal.signal(number, handler)
            if threads is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = threads
        errors = sorted(Path(tmp).glob("error.rank*"))
        if errors:
            return f"failed: {errors[0].read_text().strip()[:200]}"
        if code != 0 or not result.exists():
            return f"failed: exit code {code} and no result"
        record: dict[str, Any] = json.loads(result.read_text())
        return record


# ----------------------------------------------------------------------------- the table


def load() -> float:
    return os.getloadavg()[0]


def shares(items: int, ranks: int) -> str:
    sizes = [len(part) for part in even_split(items, ranks)]
    return " + ".join(map(str, sizes)) if ranks <= 4 else f"{min(sizes)}-{max(sizes)} each"


def row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.worker:
        worker(options)
        return
    if options.smoke:
        for name, value in SMOKE.items():
            setattr(options, name, value)
    if min(options.ranks) < 1 or options.items < 1 or options.batch_size < 1:
        parser.error(
            f"--ranks, --items and --batch-size must be positive, got {options.ranks}, "
            f"{options.items}, {options.batch_size}"
        )
    gpus = 0 if options.force_cpu else torch.cuda.device_count()
    cores = os.cpu_count() or 1
    order = sorted(set(options.ranks))
    runs: dict[int, list[dict[str, Any] | str]] = {n: [] for n in order}
    loads: dict[int, list[float]] = {n: [] for n in order}
    print(
        f"data-parallel inference: TinyLM dim {options.dim}, {options.layers} blocks, "
        f"{options.seq} tokens per item; {options.items} items in calls of {options.batch_size}; "
        f"{f'{gpus} GPUs' if gpus else 'CPU'}, 1 thread per rank, {cores} cores",
        flush=True,
    )
    print("load average before: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
    for repeat in range(options.repeats):
        for ranks in order if repeat % 2 == 0 else order[::-1]:
            loads[ranks].append(load())
            if gpus and ranks > gpus:
                runs[ranks].append(f"skipped: needs {ranks} GPUs, {gpus} visible")
                continue
            runs[ranks].append(launch(options, ranks))
    rates: dict[int, float] = {}
    lines = [row(["ranks", "items/s", "vs 1 rank", "ideal", "seconds", "items per rank",
                  "load", "note"]), "|" + "---|" * 8]  # fmt: skip
    for ranks in order:
        good = [r for r in runs[ranks] if isinstance(r, dict)]
        note = "" if gpus or ranks <= cores else f"oversubscribed: {ranks} ranks on {cores} cores"
        if not good:
            failure = next(str(r) for r in runs[ranks])
            lines.append(row([ranks, failure, "", ranks, "", "", f"{loads[ranks][0]:.2f}", note]))
            continue
        seconds = statistics.median(r["seconds"] for r in good)
        rates[ranks] = options.items / seconds
        ratio = f"{rates[ranks] / rates[1]:.2f}" if 1 in rates else "-"
        load_text = "/".join(f"{v:.2f}" for v in loads[ranks])
        lines.append(
            row([ranks, f"{rates[ranks]:.1f}", ratio, ranks, f"{seconds:.3f}",
                 shares(options.items, ranks), load_text, note])
        )  # fmt: skip
    print("\n".join(lines))
    print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)


if __name__ == "__main__":
    main()
