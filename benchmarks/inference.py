"""Data-parallel generation on CPU ranks: items per second of the Llama 3 debug model at 1, 2, 4.

Usage: ``python benchmarks/inference.py [--ranks 1 2 4] [--prompts 64] [--new-tokens 8]``
(see benchmarks/README.md); ``--smoke`` is a tiny, fast run for the test suite.

What runs. For each rank count in ``--ranks`` the script spawns that many fresh CPU processes
(gloo, ``OMP_NUM_THREADS=1`` and one intra-op thread each). Every rank builds the generator of
``examples/llama3/generate.py`` (``Llama3Generator``: the Llama 3 ``debug`` shape, dim 256,
4 layers, 8 heads, 4 key/value heads, vocabulary 2048, freshly initialized from seed 0, the
default stdlib BPE tokenizer) inside ``trainer.serving()`` and calls ``trainer.predict`` on the
same ``--prompts`` short prompts (``def f_<i>(x):``), ``--batch`` prompts per call. Each prompt
is continued greedily by up to ``--new-tokens`` tokens, one full forward per new token (no key
/value cache), stopping at the end-of-text token. ``predict`` splits the prompts evenly over
the data-parallel ranks and gathers the completions, in input order, on rank 0. ``--layout
ddp`` (the default) gives each rank a full copy of the weights and lets it work alone;
``fsdp`` shards them, so every forward all-gathers the weights and the ranks run in lockstep.
The 1-rank layout runs first and, except in ``--smoke``, again at the end.

What is timed. After an untimed ``predict`` of ``--warmup`` prompts and a barrier, rank 0 times
one ``predict`` of all prompts: from the call until every completion is back on rank 0
(setup, model building and the tokenizer are left out). Reported: prompts per second and new
tokens per second over that time, their ratio to the mean of the 1-rank runs and the ideal
(the rank count); ``cpu/wall``: the thread CPU time inside ``predict_step`` over the timed wall
time, mean over ranks (about 1: every rank computing the whole time, side by side; below 1:
waiting for a peer or for a core); ``same output``: whether the completions equal those of the
first 1-rank run (the same work was done). The 1-minute load average at the start of each run
is printed beside its row, and ``/proc/loadavg`` before and after the whole run. Rows with more
ranks than CPUs are marked ``oversubscribed``: the ranks take turns on the cores, so their
times measure the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import spawned_ranks
from dream_trainer.configs import DeviceParameters
from dream_trainer.inference import even_split

Layout = Literal["ddp", "fsdp"]
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """Model shape; the defaults are the llama3 ``debug`` model (the tokenizer has 2048 ids)."""

    dim: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    seq: int = 128

    def overrides(self) -> dict[str, int]:
        return {
            "dim": self.dim,
            "n_layers": self.layers,
            "n_heads": self.heads,
            "n_kv_heads": self.kv_heads,
            "multiple_of": 32,
        }


SMOKE_SIZES = Sizes(dim=32, layers=1, heads=4, kv_heads=2, seq=32)


@dataclass(frozen=True)
class Job:
    """One launch: ``ranks`` processes generating for ``prompts`` prompts."""

    ranks: int
    layout: Layout
    sizes: Sizes
    prompts: int
    new_tokens: int
    batch: int
    warmup: int


def prompts(n: int) -> list[dict[str, Any]]:
    return [{"id": f"p{i:04d}", "prompt": f"def f_{i}(x):"} for i in range(n)]


def device_parameters(job: Job) -> DeviceParameters:
    if job.ranks == 1:
        return DeviceParameters.SINGLE_DEVICE()
    return DeviceParameters.FSDP() if job.layout == "fsdp" else DeviceParameters.DDP()


def generate(job: Job, rank: int) -> dict[str, Any]:
    """Serve the generator on this rank; time one ``predict`` of every prompt."""
    import torch.distributed as dist

    import examples.llama3.generate as llama_generate
    from dream_trainer.configs import config_from_command_line
    from examples.llama3.generate import Llama3Generator
    from examples.llama3.presets import preset
    from examples.llama3.train import Llama3Config

    options = [
        "--model_overrides", json.dumps(job.sizes.overrides()),
        "--seq_len", str(job.sizes.seq),
        "--seed", str(SEED),
        "--device_parameters", json.dumps(device_parameters(job).model_dump(mode="json")),
    ]  # fmt: skip
    config = config_from_command_line(preset("debug", Llama3Config), options, program="bench")
    generator = Llama3Generator(config, device="cpu")
    generator.max_new_tokens = job.new_tokens
    generator.greedy = True
    busy: dict[str, Any] = {"cpu": 0.0, "new_tokens": {}}
    step, continue_ids = generator.predict_step, llama_generate.continue_ids
    counts: list[int] = []

    def counted_continue_ids(trainer: Any, ids: list[int], *a: Any, **kw: Any) -> list[int]:
        out: list[int] = continue_ids(trainer, ids, *a, **kw)
        counts.append(len(out) - len(ids))
        return out

    def timed_step(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        counts.clear()
        start = time.thread_time()
        out = step(batch)
        busy["cpu"] += time.thread_time() - start
        # By id: the padding items of a lockstep (FSDP) run repeat a real item and count once.
        busy["new_tokens"].update(zip((r["id"] for r in batch), counts))
        return out

    # Wrapped in this process only; the generator and the model are not changed.
    generator.predict_step = timed_step  # type: ignore[method-assign]
    llama_generate.continue_ids = counted_continue_ids
    with generator.serving():
        generator.predict(prompts(job.warmup), batch_size=job.batch)
        busy.update(cpu=0.0, new_tokens={})
        if dist.is_initialized():
            dist.barrier(group=generator.world.cpu_group)
        start = time.perf_counter()
        results = generator.predict(prompts(job.prompts), batch_size=job.batch)
        seconds = time.perf_counter() - start
    completions = [r["completion"] for r in results] if results is not None else None
    return {"rank": rank, "seconds": seconds, **busy, "completions": completions}


def launch(job: Job, timeout: float) -> list[dict[str, Any]] | str:
    """Run ``job`` on fresh processes; the per-rank results, or why there are none."""
    return spawned_ranks.launch(generate, quiet, job, job.ranks, timeout, prefix="infer-bench-")


def quiet() -> None:
    # The trainer and the inference loop log their layout and shares at every launch.
    logging.getLogger("dream_trainer").setLevel(logging.WARNING)


# Figures

COLUMNS = (
    "run",
    "ranks/CPUs",
    "prompts/rank",
    "prompts/s",
    "/ 1 rank",
    "ideal",
    "new tokens/s",
    "seconds",
    "cpu/wall",
    "same output",
    "load",
)
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)

LEGEND = """\
prompts/s: prompts over rank 0's time for one predict of all of them (split over the ranks,
completions gathered in input order); / 1 rank: over the mean of the 1-rank runs; ideal: the
rank count. new tokens/s: tokens generated for the prompts (each once) over that time.
cpu/wall: thread CPU time inside predict_step over the timed wall time, mean over ranks (1:
every rank computing all the time, side by side). same output: completions equal to the first
1-rank run. load: 1-minute load average at the start of the row's run. oversubscribed: more
ranks than CPUs, so the ranks take turns on the cores and the row measures the machine."""


def table_row(cells: dict[str, str]) -> str:
    """A markdown row from ``cells`` by column name; the missing ones are left empty."""
    unknown = set(cells) - set(COLUMNS)
    if unknown:
        raise KeyError(f"no such columns: {sorted(unknown)}")
    return "| " + " | ".join(cells.get(c, "").replace("|", "/") for c in COLUMNS) + " |"


def result_row(
    label: str,
    job: Job,
    results: list[dict[str, Any]],
    base_rate: float,
    reference: list[str] | None,
    at: float,
) -> str:
    cpus = os.cpu_count() or 1
    seconds = results[0]["seconds"]
    rate = job.prompts / seconds
    tokens_by_id: dict[str, int] = {}
    for r in results:
        tokens_by_id.update(r["new_tokens"])
    new_tokens = sum(tokens_by_id.values())
    cpu_wall = statistics.mean(r["cpu"] / seconds for r in results)
    shares = sorted({len(part) for part in even_split(job.prompts, job.ranks)}, reverse=True)
    return table_row(
        {
            "run": label,
            "ranks/CPUs": f"{job.ranks}/{cpus}" + (" oversubscribed" if job.ranks > cpus else ""),
            "prompts/rank": "/".join(map(str, shares)),
            "prompts/s": f"{rate:.2f}",
            "/ 1 rank": f"{rate / base_rate:.3f}" if base_rate else "n/a",
            "ideal": str(job.ranks),
            "new tokens/s": f"{new_tokens / seconds:.1f}",
            "seconds": f"{seconds:.2f}",
            "cpu/wall": f"{cpu_wall:.2f}",
            "same output": str(results[0]["completions"] == reference).lower(),
            "load": f"{at:.2f}",
        }
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], metavar="N")
    parser.add_argument("--layout", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per timed predict")
    parser.add_argument("--new-tokens", type=int, default=8, help="new tokens per prompt, at most")
    parser.add_argument("--batch", type=int, default=4, help="prompts per predict_step call")
    parser.add_argument("--warmup", type=int, default=4, help="prompts of the untimed predict")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 and 2 ranks")
    defaults = Sizes()
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field.name))
    if parser.parse_args(argv).smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(
            ranks=[1, 2], prompts=8, new_tokens=2, batch=2, warmup=2, **vars(SMOKE_SIZES)
        )
    args = parser.parse_args(argv)
    if 1 not in args.ranks or min(args.ranks) < 1:
        parser.error(f"--ranks must include 1 (the reference) and be positive, got {args.ranks}")
    for name in ("prompts", "batch", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be at least 1, got {args.new_tokens}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    started = time.monotonic()
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    cpus = os.cpu_count() or 1
    counts = sorted(set(args.ranks))
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}\n"
        f"{cpu_model()}, {cpus} CPUs; {', '.join(map(str, counts))} ranks, gloo, 1 thread per "
        f"rank, layout {args.layout}\n{sizes}: llama3 debug shape, vocabulary 2048; "
        f"{args.prompts} prompts, up to {args.new_tokens} new tokens each (greedy), "
        f"{args.batch} per call\nload average before (/proc/loadavg): {loadavg()}",
        flush=True,
    )

    def job(ranks: int) -> Job:
        return Job(
            ranks, args.layout, sizes, args.prompts, args.new_tokens, args.batch, args.warmup
        )

    done: list[tuple[str, Job, list[dict[str, Any]], float]] = []
    failed: list[str] = []
    base_rates: list[float] = []
    reference: list[str] | None = None

    def run(label: str, this: Job) -> None:
        nonlocal reference
        at = os.getloadavg()[0]
        outcome = launch(this, args.timeout)
        elapsed = f"({time.monotonic() - started:.0f} s)"
        if isinstance(outcome, str):
            failed.append(table_row({"run": label, "prompts/s": f"failed: {outcome}"}))
            print(f"{label}: FAILED: {outcome} {elapsed}", file=sys.stderr, flush=True)
            return
        if this.ranks == 1:
            base_rates.append(this.prompts / outcome[0]["seconds"])
            if reference is None:
                reference = outcome[0]["completions"]
        done.append((label, this, outcome, at))
        print(f"{label}: done {elapsed}", file=sys.stderr, flush=True)

    run("1 rank (run 1)", job(1))
    for ranks in (n for n in counts if n > 1):
        run(f"{ranks} ranks", job(ranks))
    if not args.smoke:
        run("1 rank (run 2)", job(1))

    base = statistics.mean(base_rates) if base_rates else 0.0
    rows = [result_row(label, this, out, base, reference, at) for label, this, out, at in done]
    print(LEGEND, HEADER, *rows, *failed, sep="\n")
    print(
        f"load average after (/proc/loadavg): {loadavg()}; wall time "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
