"""Pipeline schedules on CPU ranks: step time, measured bubble and theoretical bubble.

Usage: ``python benchmarks/pipeline.py [--ranks 4] [--schedules GPipe 1F1B ...]`` (see
benchmarks/README.md); ``--smoke`` is a tiny, fast run for the test suite.

What runs. For each pipeline schedule this torch has (GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV), the script spawns ``--ranks`` fresh CPU
processes (gloo, ``OMP_NUM_THREADS=1`` and one intra-op thread each) and trains a transformer
(token embedding, ``--blocks`` pre-norm blocks, final norm, output head) through
``DreamTrainer.fit()`` with ``pipeline_parallel=ranks``, no data parallelism, AdamW and
clipping at 1.0. ``training_step`` calls ``self.forward_backward``, which runs the rank's stages
through the schedule. Every batch holds ``--microbatches`` x ``--microbatch-size`` sequences and
is split into ``--microbatches`` microbatches; the blocks are balanced over the stages with the
embedding counted as 0 blocks and the norm + head as ``--last-weight`` blocks.

Without pipeline parallelism, in the same run: the same model, data and global batch trained by
one process with one thread through the same trainer class (``forward_backward`` then calls the
model directly), in two ways: the whole batch in one forward and backward, and the same
microbatches one after another with gradient accumulation (the work the pipeline does, minus
the pipelining). Each runs once before the schedules and once after them; the ratio columns
divide by the median of their runs. Each schedule and baseline gets its own processes, so one
that fails or hangs (``--timeout``) is reported in its row and the others still run.
``--repeats N`` runs the schedules N times (in alternating order, the baselines between the
passes) and shows each schedule's median run, listing the step times of all its runs.

What is timed, per rank, over the timed steps (after ``--warmup`` untimed ones):

- *step*: a callback stamps ``time.perf_counter()`` at ``post_optimizer_zero_grad``; a step is
  the time between two stamps (data, the pipelined forward and backward, gradient norm and
  clipping with its all-reduce over the pipeline ranks, AdamW, the trainer's bookkeeping).
  Reported: the median over timed steps of the slowest rank's step.
- *pipeline*: wall time inside ``self.forward_backward(...)``: the schedule's ``step`` plus the
  trainer's microbatch bookkeeping and its broadcast of the losses from the last stage
  (reported like the step: the median over steps of the slowest rank).
- *compute*: wall time inside the methods of ``torch.distributed.pipelining.PipelineStage`` that
  run the stage's module: ``forward_one_chunk`` (the forward of one microbatch),
  ``backward_one_chunk`` (its full backward, or the input-gradient half in zero-bubble
  schedules) and ``backward_weight_one_chunk`` (the weight-gradient half), plus the loss
  function's forward on the last stage. The benchmark wraps these methods on the class inside
  its own processes (a measurement tool; torch and Dream Trainer are not changed). They contain
  no communication: sends and receives are posted and waited for by the schedule between them.
  Reported: per step (median over steps, mean over ranks), since schedules that keep more
  microbatches' activations alive or split backward in two do more compute for the same work.
- *in P2P*: wall time inside the private helpers through which every schedule posts and waits
  for its sends and receives, ``torch.distributed.pipelining.schedules._batch_p2p``,
  ``_sorted_batch_p2p`` and ``_wait_batch_p2p``, wrapped the same way when this torch has them
  (the column says ``n/a`` when one is missing).
- *schedule*: wall time inside torch's schedule ``step`` (``PipelineScheduleSingle.step`` and
  ``PipelineScheduleMulti.step``, wrapped likewise). "outside schedule" is the rest of the
  pipeline time, almost all of it the trainer's broadcast of the losses, where ranks whose last
  microbatch finished early wait for the others (the drain part of the bubble).

Measured bubble of a rank: the median over timed steps of 1 - compute / pipeline, the share of
its pipeline time the rank did not spend running its stages' forward and backward. Reported:
the mean over ranks and the max. "in P2P" and "outside schedule" (same medians, means over
ranks) split it: blocked in or posting a send/receive, and waiting at the end of the step; the
rest is the schedules' own Python between actions. Theoretical bubble: (p-1)/(m+p-1) for one
stage per rank (GPipe, 1F1B) and (p-1)/(v*m+p-1) with v stages per rank for the others, p ranks
and m microbatches; it assumes equal stages and free communication. The zero-bubble schedules
(InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) split backward into input and weight halves
to fill the bubble, so they aim below it.

``compute cpu/wall``: the thread CPU time inside compute over its wall time there (for the
one-process rows: inside ``forward_backward``). 1.0 means the rank had a core whenever it
computed; with more ranks than cores, or other jobs on the machine, it falls, compute wall time
stretches, and the measured bubble then mixes the schedule's idle time with waiting for a core
(a rank waits for a neighbour that is not running). It is the row's noise gauge. The 1-minute
load average at the start of each run is printed beside every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.trainer import Callback

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import spawned_ranks

SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
SINGLE_STAGE = ("GPipe", "1F1B")
ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
SMOKE_SCHEDULES = ("GPipe", "Interleaved1F1B")
SEED = 0
LR = 1e-3
CLIP = 1.0
LOG_EVERY = 10


@dataclass(frozen=True)
class Sizes:
    """Model and batch shape; the defaults give tens of ms of compute per stage and step."""

    vocab: int = 512
    dim: int = 256
    blocks: int = 8
    heads: int = 4
    seq: int = 64
    microbatches: int = 8
    microbatch_size: int = 1

    @property
    def batch(self) -> int:
        """The global batch (sequences per optimizer step), the same with and without PP."""
        return self.microbatches * self.microbatch_size


SMOKE_SIZES = Sizes(vocab=64, dim=32, blocks=4, heads=2, seq=16, microbatches=4)


@dataclass(frozen=True)
class Job:
    """One launch: a schedule on ``ranks`` processes, or ``schedule=None`` for one process
    (``accumulate``: the batch as ``microbatches`` accumulated micro-batches, else in one go)."""

    schedule: str | None
    ranks: int
    sizes: Sizes
    warmup: int
    steps: int
    last_weight: float
    accumulate: bool = False


# The model


class Block(nn.Module):
    """Pre-norm transformer block: causal attention and a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.w13 = nn.Linear(dim, 4 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, t, 3, self.heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, d))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Transformer(nn.Module):
    """Embedding, blocks (``self.layers``, what the pipeline split cuts), norm, output head.

    A pipeline stage holds some of the blocks and sets the modules it does not hold to None,
    so ``forward`` skips those: stage 0 takes tokens, the others take activations.
    """

    def __init__(self, sizes: Sizes) -> None:
        super().__init__()
        self.embedding = nn.Embedding(sizes.vocab, sizes.dim)
        self.layers = nn.ModuleList(Block(sizes.dim, sizes.heads) for _ in range(sizes.blocks))
        self.norm = nn.RMSNorm(sizes.dim)
        self.output = nn.Linear(sizes.dim, sizes.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens) if self.embedding is not None else tokens
        for layer in self.layers:
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def init_weights(self) -> None:
        """Deterministic from torch's global RNG (the trainer calls this after seeding)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token rows; labels are the next tokens."""

    def __init__(self, sizes: Sizes, rows: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, sizes.vocab, (rows, sizes.seq + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


# Meters: what the ranks count


KINDS = ("compute", "compute_cpu", "p2p", "schedule", "pipeline", "pipeline_cpu")
"""What the meters count (seconds); ``*_cpu``: the thread CPU time inside that kind."""


class Meter:
    """Seconds accumulated by the wrapped functions in this process, per kind."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.depth = dict.fromkeys(KINDS, 0)  # a kind's nested calls are not counted twice

    def snapshot(self) -> tuple[float, ...]:
        return tuple(self.seconds[kind] for kind in KINDS)


METER = Meter()


def _timed(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if METER.depth[kind]:
            return fn(*args, **kwargs)
        METER.depth[kind] += 1
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            METER.seconds[kind] += time.perf_counter() - wall
            if f"{kind}_cpu" in METER.seconds:
                METER.seconds[f"{kind}_cpu"] += time.thread_time() - cpu
            METER.depth[kind] -= 1

    return wrapper


STAGE_METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
P2P_HELPERS = ("_batch_p2p", "_sorted_batch_p2p", "_wait_batch_p2p")


def install_meters() -> list[str]:
    """Wrap the stages' compute methods, the schedules' ``step`` and their P2P helpers (on the
    classes and module of this process); return the names this torch lacks."""
    from torch.distributed.pipelining import PipelineStage, schedules

    missing = []
    targets = [(PipelineStage, name, "compute") for name in STAGE_METHODS]
    targets += [(schedules, name, "p2p") for name in P2P_HELPERS]
    targets += [
        (getattr(schedules, cls, None), "step", "schedule")
        for cls in ("PipelineScheduleSingle", "PipelineScheduleMulti")
    ]
    for owner, name, kind in targets:
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None:
            missing.append(name if owner is None else f"{getattr(owner, '__name__', owner)}.{name}")
        else:
            setattr(owner, name, _timed(fn, kind))
    return missing


@functools.partial(_timed, kind="compute")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss; its forward counts as compute (its backward runs in ``backward_one_chunk``)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


# The trainer


class BenchConfig(DreamTrainerConfig):
    sizes: Sizes = Sizes()


class PipelineBenchTrainer(DreamTrainer):
    config: BenchConfig

    def configure_models(self) -> None:
        self.model = Transformer(self.config.sizes)

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        steps = self.config.training_parameters.max_steps
        assert steps is not None
        sizes = self.config.sizes
        data = Tokens(sizes, steps * sizes.batch)
        # No data parallelism: every pipeline rank reads the same global batch (or, accumulating
        # without a pipeline, the same rows a microbatch at a time).
        accumulating = self.config.training_parameters.gradient_accumulation_steps > 1
        batch = sizes.microbatch_size if accumulating else sizes.batch
        return DataLoader(data, batch_size=batch, shuffle=False, drop_last=True), None

    layout: tuple[list[int], list[str]] = ([], [])
    """(stage indices, their contents) of this rank, kept while the world is up."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if batch_idx == 0 and self.world.pp_enabled:
            parts = self.model_parts()["model"]
            self.layout = (self.pipeline_stage_indices(), [stage_contents(p) for p in parts])
        loss = timed_forward_backward(
            self, self.model, batch["inputs"], batch["labels"], cross_entropy
        )
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}


@functools.partial(_timed, kind="pipeline")
def timed_forward_backward(trainer: DreamTrainer, *args: Any) -> torch.Tensor:
    return trainer.forward_backward(*args)


class StepClock(Callback[DreamTrainer]):
    """Stamps the clock and the meters at the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, tuple[float, ...]]] = []

    def post_optimizer_zero_grad(self, optimizer: Any) -> None:
        self.stamps.append((time.perf_counter(), METER.snapshot()))


def device_parameters(job: Job) -> DeviceParameters:
    if job.schedule is None:
        return DeviceParameters.SINGLE_DEVICE()
    return DeviceParameters(
        pipeline_parallel=job.ranks,
        dp_shard=1,
        pipeline_parallel_config={
            "schedule": job.schedule,
            "num_microbatches": job.sizes.microbatches,
            "first_stage_weight": 0.0,  # an embedding lookup costs next to nothing
            "last_stage_weight": job.last_weight,
        },
    )


def stage_contents(part: nn.Module) -> str:
    """``emb+L0-1`` style: which modules one pipeline part holds."""
    names = [str(k) for k, _ in part.layers.named_children()] if part.layers is not None else []
    text = f"L{names[0]}-{names[-1]}" if len(names) > 1 else (f"L{names[0]}" if names else "")
    if part.embedding is not None:
        text = "emb+" + text
    if part.output is not None:
        text += "+head"
    return text


def train(job: Job, rank: int) -> dict[str, Any]:
    """Train on this rank; return its timed figures."""
    missing = install_meters() if job.schedule is not None else []
    config = BenchConfig(
        seed=SEED,
        sizes=job.sizes,
        device_parameters=device_parameters(job),
        training_parameters=TrainingParameters(
            max_steps=job.warmup + job.steps,
            gradient_accumulation_steps=job.sizes.microbatches if job.accumulate else 1,
            gradient_clip_val=CLIP,
        ),
        logging_parameters=LoggingParameters(log_every_n_steps=LOG_EVERY, backends=[]),
    )
    clock = StepClock()
    trainer = PipelineBenchTrainer(config, callbacks=[clock])
    trainer.fit()
    stamps = clock.stamps
    if len(stamps) != job.warmup + job.steps:
        raise RuntimeError(f"expected {job.warmup + job.steps} optimizer steps, saw {len(stamps)}")
    # Per timed step: wall seconds, and each meter's increment.
    pairs = list(itertools.pairwise(stamps[job.warmup - 1 :]))
    result: dict[str, Any] = {"rank": rank, "steps": [b[0] - a[0] for a, b in pairs]}
    for index, kind in enumerate(KINDS):
        result[kind] = [b[1][index] - a[1][index] for a, b in pairs]
    return {
        **result,
        "stages": trainer.layout[0],
        "contents": trainer.layout[1],
        "missing": missing,
    }


def launch(job: Job, timeout: float) -> list[dict[str, Any]] | str:
    """Run ``job`` on fresh processes; the per-rank results, or why there are none."""
    return spawned_ranks.launch(train, quiet, job, job.ranks, timeout, prefix="pp-bench-")


# Figures


def available(schedule: str) -> bool:
    from torch.distributed.pipelining import schedules

    try:
        schedules.get_schedule_class(schedule)
    except ValueError:
        return False
    return True


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule in SINGLE_STAGE else 2


def theoretical_bubble(ranks: int, per_rank: int, microbatches: int) -> float:
    """(p-1)/(v*m+p-1); v = 1 gives the single-stage (p-1)/(m+p-1)."""
    return (ranks - 1) / (per_rank * microbatches + ranks - 1)


def step_ms(results: list[dict[str, Any]], key: str = "steps") -> float:
    """Median over timed steps of the slowest rank's step (or its ``key`` time), in ms."""
    per_step = [max(steps) for steps in zip(*(r[key] for r in results))]
    return statistics.median(per_step) * 1e3


def median_share(result: dict[str, Any], part: str) -> float:
    """Median over timed steps of this rank's ``part`` seconds / its pipeline seconds."""
    return statistics.median(x / p for x, p in zip(result[part], result["pipeline"]))


def load() -> float:
    return os.getloadavg()[0]


COLUMNS = (
    "schedule",
    "stages/rank",
    "microbatches",
    "step ms",
    "PP/no-PP",
    "PP/no-PP µb",
    "pipeline ms",
    "compute ms",
    "bubble mean",
    "bubble max",
    "in P2P",
    "outside schedule",
    "theory",
    "compute cpu/wall",
    "load",
)
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(cells: dict[str, str]) -> str:
    """A markdown row from ``cells`` by column name; the missing ones are left empty."""
    unknown = set(cells) - set(COLUMNS)
    if unknown:
        raise KeyError(f"no such columns: {sorted(unknown)}")
    return "| " + " | ".join(cells.get(c, "").replace("|", "/") for c in COLUMNS) + " |"


@dataclass
class Baselines:
    """Step ms of the one-process runs: the whole batch at once, and as accumulated
    microbatches (the same microbatches the pipeline runs)."""

    full: list[float] = dataclasses.field(default_factory=list)
    micro: list[float] = dataclasses.field(default_factory=list)

    def ratio(self, ms: float, accumulate: bool) -> str:
        """``ms`` over the median of the runs of that kind."""
        runs = self.micro if accumulate else self.full
        return f"{ms / statistics.median(runs):.3f}" if runs else "n/a"


def baseline_row(
    label: str, results: list[dict[str, Any]], job: Job, base: Baselines, at: float
) -> str:
    (result,) = results
    ms = step_ms(results)
    return table_row(
        {
            "schedule": label,
            "stages/rank": "-",
            "microbatches": f"{job.sizes.microbatches} accumulated"
            if job.accumulate
            else "1 (whole)",
            "step ms": f"{ms:.1f}",
            "PP/no-PP": base.ratio(ms, False),
            "PP/no-PP µb": base.ratio(ms, True),
            "pipeline ms": f"{step_ms(results, 'pipeline'):.1f}",
            "compute cpu/wall": f"{sum(result['pipeline_cpu']) / sum(result['pipeline']):.2f}",
            "load": f"{at:.2f}",
        }
    )


def schedule_row(
    schedule: str, results: list[dict[str, Any]], job: Job, base: Baselines, at: float
) -> str:
    per_rank = len(results[0]["stages"])
    bubbles = [1 - median_share(r, "compute") for r in results]
    missing = [m for r in results for m in r["missing"]]

    def mean_share(kind: str, helpers: tuple[str, ...], outside: bool = False) -> str:
        if any(m.endswith(h) for m in missing for h in helpers):
            return "n/a"  # this torch lacks what is wrapped
        shares = [median_share(r, kind) for r in results]
        return f"{statistics.mean(1 - x if outside else x for x in shares):.3f}"

    ms = step_ms(results)
    theory = theoretical_bubble(job.ranks, per_rank, job.sizes.microbatches)
    compute = statistics.mean(statistics.median(r["compute"]) for r in results)
    cpu = statistics.mean(sum(r["compute_cpu"]) / sum(r["compute"]) for r in results)
    return table_row(
        {
            "schedule": schedule,
            "stages/rank": str(per_rank),
            "microbatches": str(job.sizes.microbatches),
            "step ms": f"{ms:.1f}",
            "PP/no-PP": base.ratio(ms, False),
            "PP/no-PP µb": base.ratio(ms, True),
            "pipeline ms": f"{step_ms(results, 'pipeline'):.1f}",
            "compute ms": f"{compute * 1e3:.1f}",
            "bubble mean": f"{statistics.mean(bubbles):.3f}",
            "bubble max": f"{max(bubbles):.3f}",
            "in P2P": mean_share("p2p", P2P_HELPERS),
            "outside schedule": mean_share("schedule", (".step",), outside=True),
            "theory": f"{theory:.3f}" + (" (ZB: aims below)" if schedule in ZERO_BUBBLE else ""),
            "compute cpu/wall": f"{cpu:.2f}",
            "load": f"{at:.2f}",
        }
    )


LEGEND = """\
step ms: median over timed steps of the slowest rank's optimizer step. PP/no-PP: step ms over the
mean of the one-process runs that take the whole batch at once; PP/no-PP µb: over those that
accumulate it as the same microbatches (same model, data and global batch; no pipeline).
pipeline ms: the same median for the time inside forward_backward (one process: all of its
forward and backward in the step). compute ms: per rank, the median over timed steps of the
time inside PipelineStage forward_one_chunk, backward_one_chunk, backward_weight_one_chunk and
the loss forward; the mean over ranks. bubble: per rank, the median over timed steps of
1 - compute / pipeline; mean and max over ranks.
in P2P: the same median share of pipeline time spent in the schedules' P2P helpers (posting and
waiting for sends and receives); outside schedule: the share outside torch's schedule step
(mostly the trainer's loss broadcast, where ranks that finished first wait for the last); both
means over ranks. The rest of the bubble is the schedules' own Python. theory: (p-1)/(m+p-1)
for 1 stage per rank, (p-1)/(v*m+p-1) for v stages per rank; zero-bubble (ZB) schedules aim
below it. compute cpu/wall: thread CPU time / wall time inside compute (below 1: the rank
waited for a core while computing, so its bubble reads low). load: 1-minute load average at the
start of the row's run."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parameter_count(sizes: Sizes) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(sizes).parameters())


def quiet() -> None:
    # The trainer logs its layout at every launch; that is setup, not what is measured.
    logging.getLogger("dream_trainer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="torch.distributed.pipelining")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks (CPU processes)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), metavar="NAME")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per schedule (the median run is shown)"
    )
    parser.add_argument(
        "--last-weight", type=float, default=0.25, help="blocks the norm + head count as"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 ranks, 2 schedules")
    defaults = Sizes()
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field.name))
    if parser.parse_args(argv).smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(
            ranks=2, schedules=list(SMOKE_SCHEDULES), warmup=1, steps=3, **vars(SMOKE_SIZES)
        )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 2 or args.repeats < 1 or args.ranks < 2:
        parser.error("need --warmup >= 1, --steps >= 2, --repeats >= 1 and --ranks >= 2")
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedules {unknown}; choose from {', '.join(SCHEDULES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    started = time.monotonic()
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    oversubscribed = args.ranks > (os.cpu_count() or 1)
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}\n"
        f"{cpu_model()}, {os.cpu_count()} CPUs; {args.ranks} pipeline ranks, gloo, 1 thread per "
        f"rank{' (more ranks than CPUs: oversubscribed)' if oversubscribed else ''}\n"
        f"{sizes}: {parameter_count(sizes) / 1e6:.2f} M parameters, global batch "
        f"{sizes.batch} x {sizes.seq} tokens; {args.warmup} untimed + {args.steps} timed steps "
        f"per run, {args.repeats} run(s) per schedule\n"
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )

    def job(schedule: str | None, accumulate: bool = False) -> Job:
        ranks = 1 if schedule is None else args.ranks
        return Job(schedule, ranks, sizes, args.warmup, args.steps, args.last_weight, accumulate)

    def progress(what: str) -> None:
        print(f"{what} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    base = Baselines()
    baseline_rows: list[Callable[[], str]] = []  # rendered once every baseline is known
    runs: dict[str, list[tuple[list[dict[str, Any]], float]]] = {}  # (results, load) per run
    failures: dict[str, list[str]] = {}

    def run_baselines(index: int) -> None:
        for accumulate in (False, True) if index % 2 else (True, False):
            label = f"no PP, {'accumulated' if accumulate else 'whole batch'} (run {index})"
            at, this = load(), job(None, accumulate)
            outcome = launch(this, args.timeout)
            if isinstance(outcome, str):
                failures.setdefault(label, []).append(outcome)
                cells = {"schedule": label, "step ms": f"failed: {outcome}", "load": f"{at:.2f}"}
                baseline_rows.append(functools.partial(table_row, cells))
                progress(f"{label}: FAILED: {outcome}")
                continue
            (base.micro if accumulate else base.full).append(step_ms(outcome))
            baseline_rows.append(functools.partial(baseline_row, label, outcome, this, base, at))
            progress(f"{label}: done")

    schedules = [s for s in args.schedules if available(s)]
    for index in range(args.repeats):
        run_baselines(index + 1)
        for schedule in schedules if index % 2 == 0 else schedules[::-1]:
            at = load()
            outcome = launch(job(schedule), args.timeout)
            if isinstance(outcome, str):
                failures.setdefault(schedule, []).append(outcome)
                progress(f"{schedule}: FAILED: {outcome}")
            else:
                runs.setdefault(schedule, []).append((outcome, at))
                progress(f"{schedule}: done")
    if not args.smoke:
        run_baselines(args.repeats + 1)

    rows = [row() for row in baseline_rows]
    notes = [
        f"{s}: not in torch {torch.__version__}; skipped"
        for s in args.schedules
        if s not in schedules
    ]
    for schedule in schedules:
        done = sorted(runs.get(schedule, []), key=lambda run: step_ms(run[0]))
        for why in failures.get(schedule, []):
            notes.append(f"{schedule}: FAILED: {why}")
        if not done:
            failure = failures[schedule][0]
            rows.append(
                table_row(
                    {
                        "schedule": schedule,
                        "stages/rank": str(stages_per_rank(schedule)),
                        "microbatches": str(sizes.microbatches),
                        "step ms": f"failed: {failure}",
                    }
                )
            )
            continue
        results, at = done[(len(done) - 1) // 2]  # the median run (the faster of two)
        rows.append(schedule_row(schedule, results, job(schedule), base, at))
        if len(done) > 1:
            spread = ", ".join(f"{step_ms(r):.1f} (load {a:.2f})" for r, a in done)
            notes.append(f"{schedule}: step ms of its {len(done)} runs: {spread}")
        placement = "; ".join(
            f"rank {r['rank']}: "
            + ", ".join(f"stage {s} {c}" for s, c in zip(r["stages"], r["contents"]))
            for r in results
        )
        notes.append(f"{schedule}: {placement}")
        missing = sorted({m for r in results for m in r["missing"]})
        if missing:
            notes.append(f"{schedule}: not in this torch, so not timed: {', '.join(missing)}")

    print(LEGEND, HEADER, *rows, *notes, sep="\n")
    print(
        f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; wall time "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
