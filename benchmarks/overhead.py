"""Step-time overhead of DreamTrainer against a minimal hand-written PyTorch loop.

Usage: ``python benchmarks/overhead.py --layout single|ddp|fsdp|all`` (see benchmarks/README.md).

Both loops train the same small transformer on the same data from the same initial weights with
AdamW, 2 micro-batches per optimizer step, gradient clipping and the same parallel wrapping:
``single``: one process, plain module; ``ddp``: 2 ranks, torch's FSDP2-based ``replicate`` (what
``DeviceParameters.DDP()`` applies); ``fsdp``: 2 ranks, ``fully_shard`` per block, then the root.
Gradient sync is off on the first micro-batch of each step (``set_requires_gradient_sync``).

Timing. A *window* builds a fresh model and optimizer, runs ``warmup`` untimed steps, then
``steps`` timed ones. The trainer runs through its real ``fit()``; a callback stamps the clock at
``post_optimizer_zero_grad``, and the hand loop stamps the same point after its ``zero_grad``. A
window's time per step is (last stamp - stamp at the end of warmup) / steps: whole steps,
boundary to boundary (data loading, forward, backward, clipping, optimizer, the trainer's
bookkeeping and callbacks), without setup or teardown. Windows alternate trainer/hand, the order
flipped every round (AB BA AB ...) so that drift of a shared machine hits both alike, after one
untimed round whose losses must match between the loops. With 2 ranks a window counts the
slower rank's wall time and the CPU time of both. Reported: the median window of each loop and
their ratio; each round's ratio (min-max, the noise); fastest window / fastest window; and the
CPU-time ratio, which other processes on the machine disturb less than wall time.

Kept on purpose, because users pay for them: the trainer's host sync every step (its non-finite
gradient-norm check) and its metric all-reduce every ``log_every_n_steps`` = 10 (with no logging
backend). The hand loop reads ``loss.item()`` every 10 steps, as a loop that prints its loss does.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.trainer import Callback

PRESETS = {
    "single": DeviceParameters.SINGLE_DEVICE,
    "ddp": DeviceParameters.DDP,  # FSDP2-based replicate, as the hand loop uses
    "fsdp": DeviceParameters.FSDP,
}
LAYOUTS = tuple(PRESETS)
SEED = 0
LR = 1e-3
CLIP = 1.0
ACCUM = 2
LOG_EVERY = 10
TARGET = 1.02  # trainer/hand step-time ratio the trainer should stay under

Window = tuple[tuple[float, float], list[float]]
"""((wall, CPU) seconds per timed step, every micro-batch's loss) of one window."""


@dataclass(frozen=True)
class Sizes:
    """Model and batch shape: big enough that a step takes tens of ms on one CPU core."""

    vocab: int = 512
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 64
    batch: int = 1


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
    """Token embedding, ``layers`` blocks (in ``self.layers``, FSDP's units), norm, output head."""

    def __init__(self, sizes: Sizes) -> None:
        super().__init__()
        self.embedding = nn.Embedding(sizes.vocab, sizes.dim)
        self.layers = nn.ModuleList(Block(sizes.dim, sizes.heads) for _ in range(sizes.layers))
        self.norm = nn.RMSNorm(sizes.dim)
        self.output = nn.Linear(sizes.dim, sizes.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))

    def init_weights(self) -> None:
        """Deterministic from torch's global RNG (the trainer calls this after seeding)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)


def make_loader(sizes: Sizes, total_steps: int, rank: int, world_size: int) -> DataLoader[Any]:
    """Fixed random token rows (inputs + shifted targets): ``total_steps`` steps for this rank."""
    rows = total_steps * ACCUM * sizes.batch * world_size
    generator = torch.Generator().manual_seed(1234)
    data = torch.randint(0, sizes.vocab, (rows, sizes.seq + 1), generator=generator)
    dataset = cast("Dataset[torch.Tensor]", list(data))  # a list is a map-style dataset
    sampler: DistributedSampler[torch.Tensor] = DistributedSampler(
        dataset, world_size, rank, shuffle=True, seed=SEED
    )
    return DataLoader(dataset, batch_size=sizes.batch, sampler=sampler, drop_last=True)


def compute_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


# The trainer side


class BenchConfig(DreamTrainerConfig):
    sizes: Sizes = Sizes()


class BenchTrainer(DreamTrainer):
    config: BenchConfig

    def configure_models(self) -> None:
        self.model = Transformer(self.config.sizes)

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        steps = self.config.training_parameters.max_steps
        assert steps is not None
        loader = make_loader(self.config.sizes, steps, self.world.dp_rank, self.world.dp_size)
        return loader, None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        loss = compute_loss(self.model, batch)
        self.backward(loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}


class StepClock(Callback[DreamTrainer]):
    """Stamps the end of every optimizer step and keeps each micro-batch's loss tensor."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []
        self.losses: list[torch.Tensor] = []

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        self.losses.append(result["loss"].detach())

    def post_optimizer_zero_grad(self, optimizer: Any) -> None:
        self.stamps.append(stamp())


def trainer_window(layout: str, sizes: Sizes, warmup: int, steps: int) -> Window:
    """Train with ``DreamTrainer.fit()``; return time per timed step and micro-batch losses."""
    config = BenchConfig(
        seed=SEED,
        sizes=sizes,
        device_parameters=PRESETS[layout](),
        training_parameters=TrainingParameters(
            max_steps=warmup + steps, gradient_accumulation_steps=ACCUM, gradient_clip_val=CLIP
        ),
        logging_parameters=LoggingParameters(log_every_n_steps=LOG_EVERY, backends=[]),
    )
    clock = StepClock()
    BenchTrainer(config, callbacks=[clock]).fit()
    return per_step(clock.stamps, warmup, steps), [float(x) for x in clock.losses]


# The hand-written side


def build_hand_model(layout: str, sizes: Sizes, mesh: Any) -> nn.Module:
    """The model with the same initial weights as the trainer's, wrapped for ``layout``."""
    model = Transformer(sizes)
    torch.manual_seed(SEED)
    with torch.no_grad():
        model.init_weights()
    if layout == "ddp":
        # Private module (no public FSDP2 replicate yet); the trainer uses the same one.
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(model, mesh=mesh)
    elif layout == "fsdp":
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def hand_window(layout: str, sizes: Sizes, warmup: int, steps: int, mesh: Any) -> Window:
    """The minimal loop; same return value as :func:`trainer_window`."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if mesh is not None else (0, 1)
    model = build_hand_model(layout, sizes, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = make_loader(sizes, warmup + steps, rank, world_size)
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(0)
    sync_controlled = layout != "single"
    stamps: list[tuple[float, float]] = []
    losses: list[torch.Tensor] = []
    model.train()
    for index, batch in enumerate(loader):
        last = (index + 1) % ACCUM == 0
        if sync_controlled:
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
        loss = compute_loss(model, batch)
        (loss / ACCUM).backward()
        losses.append(loss.detach())
        if last:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if len(stamps) % LOG_EVERY == LOG_EVERY - 1:
                loss.item()
            stamps.append(stamp())
    return per_step(stamps, warmup, steps), [float(x) for x in losses]


# Measuring


def stamp() -> tuple[float, float]:
    """Wall-clock time and this process's CPU time (all its threads)."""
    return time.perf_counter(), time.process_time()


def per_step(stamps: list[tuple[float, float]], warmup: int, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over the timed steps."""
    if len(stamps) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} optimizer steps, saw {len(stamps)}")
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup - 1], stamps[-1]
    return (wall1 - wall0) / steps, (cpu1 - cpu0) / steps


def across_ranks(wall: float, cpu: float) -> tuple[float, float]:
    """The slowest rank's wall time (the job waits for it) and the CPU time of all ranks."""
    if not dist.is_initialized():
        return wall, cpu
    walls, cpus = torch.tensor([wall]), torch.tensor([cpu])
    dist.all_reduce(walls, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpus)
    return walls.item(), cpus.item()


@dataclass
class Result:
    """Per-window seconds per step of both loops, in round order."""

    layout: str
    threads: int
    wall: dict[str, list[float]]  # "trainer"/"hand" -> one value per timed window
    cpu: dict[str, list[float]]
    loss_diff: float  # max |trainer - hand| over the untimed round's micro-batch losses

    @property
    def ratio(self) -> float:
        """Median trainer window / median hand window (wall time)."""
        return statistics.median(self.wall["trainer"]) / statistics.median(self.wall["hand"])

    def row(self) -> str:
        t, h = (statistics.median(self.wall[side]) for side in ("trainer", "hand"))
        best = min(self.wall["trainer"]) / min(self.wall["hand"])
        paired = [a / b for a, b in zip(self.wall["trainer"], self.wall["hand"])]
        cpu = statistics.median(self.cpu["trainer"]) / statistics.median(self.cpu["hand"])
        return (
            f"| {self.layout:<6} | {self.threads:>7} | {t * 1e3:>10.1f} | {h * 1e3:>7.1f} "
            f"| {self.ratio:>5.3f} | {min(paired):.3f}-{max(paired):.3f} | {best:>10.3f} "
            f"| {cpu:>9.3f} | {len(paired):>6} |"
        )


HEADER = (
    "| layout | threads | trainer ms | hand ms | ratio | round ratios | best ratio | cpu ratio "
    "| rounds |\n|--------|---------|------------|---------|-------|--------------|------------"
    "|-----------|--------|"
)
LEGEND = """\
ms: median over windows of wall time per optimizer step; ratio: trainer ms / hand ms
round ratios: min-max of each round's trainer/hand; best ratio: fastest trainer window /
fastest hand window; cpu ratio: like ratio, with the CPU time of all ranks"""


def measure(
    layout: str, sizes: Sizes, rounds: int, warmup: int, steps: int, mesh: Any = None
) -> Result:
    """One untimed round, then ``rounds`` rounds of a trainer and a hand window, order flipped
    every round."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got warmup={warmup}, steps={steps}")
    sides: dict[str, Callable[[], Window]] = {
        "trainer": lambda: trainer_window(layout, sizes, warmup, steps),
        "hand": lambda: hand_window(layout, sizes, warmup, steps, mesh),
    }
    wall: dict[str, list[float]] = {"trainer": [], "hand": []}
    cpu: dict[str, list[float]] = {"trainer": [], "hand": []}
    losses: dict[str, list[float]] = {}
    for round_index in range(rounds + 1):
        order = ["trainer", "hand"] if round_index % 2 == 0 else ["hand", "trainer"]
        for side in order:
            gc.collect()
            if dist.is_initialized():
                dist.barrier()
            (wall_s, cpu_s), trajectory = sides[side]()
            wall_s, cpu_s = across_ranks(wall_s, cpu_s)
            if round_index == 0:
                losses[side] = trajectory
            else:
                wall[side].append(wall_s)
                cpu[side].append(cpu_s)
    diff = max(abs(a - b) for a, b in zip(losses["trainer"], losses["hand"]))
    return Result(layout, torch.get_num_threads(), wall, cpu, diff)


def _rank_main(rank: int, layout: str, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    quiet()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        result = measure(layout, sizes_from(args), args.rounds, args.warmup, args.steps, mesh)
        if rank == 0:
            out.put(result)
    finally:
        dist.destroy_process_group()


def run_two_ranks(layout: str, args: argparse.Namespace) -> Result:
    """Spawn 2 CPU ranks (gloo, 1 thread each) and return rank 0's result."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch starts
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank_main, args=(layout, port, args, queue), nprocs=2, start_method="spawn")
    return queue.get()


def quiet() -> None:
    # The trainer logs its layout at every launch; that is setup, not what is measured.
    logging.getLogger("dream_trainer").setLevel(logging.WARNING)


def sizes_from(args: argparse.Namespace) -> Sizes:
    return Sizes(args.vocab, args.dim, args.layers, args.heads, args.seq, args.batch)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=[*LAYOUTS, "all"], default="all")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="single layout only")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (trainer+hand each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per window")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    defaults = Sizes()
    for field in ("vocab", "dim", "layers", "heads", "seq", "batch"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Iterator[Result]:
    """One result per layout (per thread count for ``single``)."""
    for layout in LAYOUTS if args.layout == "all" else (args.layout,):
        if layout != "single":
            yield run_two_ranks(layout, args)
            continue
        for threads in args.threads:
            torch.set_num_threads(threads)
            yield measure(layout, sizes_from(args), args.rounds, args.warmup, args.steps)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {sizes_from(args)}; accumulation "
        f"{ACCUM}; windows of {args.warmup} untimed + {args.steps} timed steps",
        flush=True,
    )
    print(LEGEND, HEADER, sep="\n", flush=True)
    notes = []
    for result in run(args):
        print(result.row(), flush=True)
        verdict = "within" if result.ratio <= TARGET else "ABOVE"
        same = "match" if result.loss_diff <= 1e-4 else "DIFFER (the loops do different work)"
        notes.append(
            f"{result.layout} ({result.threads} thread/rank): ratio {result.ratio:.3f} {verdict} "
            f"the {TARGET} target; loss trajectories {same} (max diff {result.loss_diff:.1e})"
        )
    print("\n".join(notes), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
