"""Step-time overhead of DreamTrainer against a minimal hand-written PyTorch loop.

Usage: ``python benchmarks/overhead.py --layout single|ddp|fsdp|all`` (see benchmarks/README.md).

Both loops train the same small transformer on the same data from the same initial weights with
AdamW, 2 micro-batches per optimizer step, gradient clipping and the same parallel wrapping:
``single``: one process, plain module; ``ddp``: 2 ranks, torch's FSDP2-based ``replicate`` (what
``DeviceParameters.DDP()`` applies); ``fsdp``: 2 ranks, ``fully_shard`` per block, then the root.
Gradient sync is off on the first micro-batch of each step (``set_requires_gradient_sync``).

Timing: the two loops alternate step by step. The trainer runs its real ``fit()``; a callback
at ``post_optimizer_zero_grad`` (the end of each of its optimizer steps) runs one optimizer
step of the hand loop, then hands control back. So every trainer step is followed by a hand
step, milliseconds apart, and whatever else the machine does slows both alike. A trainer step
is the time from the end of the previous hand step to its own ``post_optimizer_zero_grad``:
data loading, forward, backward, clipping, optimizer, the trainer's bookkeeping, callbacks and
its metric all-reduce every ``log_every_n_steps`` = 10; a hand step is timed around its call.
Both wall time and CPU time (this process, all threads) are read.

A window is one ``fit()`` with a fresh model and optimizer on both sides: ``warmup`` untimed
steps, then ``steps`` timed ones, cut into blocks of 10 consecutive steps (each holds one
trainer log step and one hand ``loss.item()``). With 2 ranks a block counts the slower rank's
wall time and the CPU time of both. Reported, pooled over ``rounds`` windows: median trainer
block / median hand block (wall and CPU), the 10th-90th percentile of per-block ratios (the
noise), and, with ``--control`` (the default), the same measurement with the hand loop against
a second copy of itself: what a ratio measured this way reads when there is no difference.
The first window's per-micro-batch losses are compared between the loops (same work).

Kept on purpose, because users pay for them: the trainer's host sync every step on the CPU (its
non-finite gradient-norm check) and its metric all-reduce every 10 steps (no logging backend).
The hand loop reads ``loss.item()`` every 10 steps, as a loop that prints its loss does.
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
TARGET = 1.01  # trainer/hand step-time ratio the trainer should stay under


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


class Interleave(Callback[DreamTrainer]):
    """Runs one hand-loop step after every trainer optimizer step and times both sides."""

    def __init__(self, hand: HandLoop) -> None:
        self.hand = hand
        self.trainer_steps: list[Stamp] = []
        self.hand_steps: list[Stamp] = []
        self.losses: list[torch.Tensor] = []
        self._resumed: Stamp | None = None  # when the trainer got control back

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        self.losses.append(result["loss"].detach())

    def post_optimizer_zero_grad(self, optimizer: Any) -> None:
        done = stamp()
        if self._resumed is not None:
            self.trainer_steps.append(elapsed(self._resumed, done))
        self.hand_steps.append(timed(self.hand.step))
        self._resumed = stamp()


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


class HandLoop:
    """The minimal loop, one optimizer step per :meth:`step` call."""

    def __init__(self, layout: str, sizes: Sizes, total_steps: int, mesh: Any) -> None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if mesh is not None else (0, 1)
        self.model = build_hand_model(layout, sizes, mesh)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        loader = make_loader(sizes, total_steps, rank, world_size)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        self.batches = iter(loader)
        self.sync_controlled = layout != "single"
        self.steps = 0
        self.losses: list[torch.Tensor] = []

    def step(self) -> None:
        model = self.model
        for micro in range(ACCUM):
            if self.sync_controlled:
                model.set_requires_gradient_sync(micro == ACCUM - 1)  # type: ignore[operator]
            loss = compute_loss(model, next(self.batches))
            (loss / ACCUM).backward()
            self.losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.steps % LOG_EVERY == LOG_EVERY - 1:
            loss.item()
        self.steps += 1


# Measuring

Stamp = tuple[float, float]
"""(wall, CPU) seconds: a clock reading, or the time between two."""


def stamp() -> Stamp:
    """Wall-clock time and this process's CPU time (all its threads)."""
    return time.perf_counter(), time.process_time()


def elapsed(start: Stamp, end: Stamp) -> Stamp:
    return end[0] - start[0], end[1] - start[1]


def timed(fn: Callable[[], None]) -> Stamp:
    start = stamp()
    fn()
    return elapsed(start, stamp())


@dataclass
class Window:
    """One window's timed steps of both sides, and every micro-batch loss (trainer vs hand)."""

    first: list[Stamp]  # the trainer's steps (the first hand loop's in the control)
    second: list[Stamp]  # the hand loop's steps
    losses: tuple[list[float], list[float]]


def trainer_config(layout: str, sizes: Sizes, total_steps: int) -> BenchConfig:
    return BenchConfig(
        seed=SEED,
        sizes=sizes,
        device_parameters=PRESETS[layout](),
        training_parameters=TrainingParameters(
            max_steps=total_steps, gradient_accumulation_steps=ACCUM, gradient_clip_val=CLIP
        ),
        logging_parameters=LoggingParameters(log_every_n_steps=LOG_EVERY, backends=[]),
    )


def trainer_vs_hand(layout: str, sizes: Sizes, warmup: int, steps: int, mesh: Any) -> Window:
    """``fit()`` with a hand step after each of its steps; ``warmup`` pairs are dropped."""
    total = warmup + steps + 1  # the trainer's first step has no start stamp
    hand = HandLoop(layout, sizes, total, mesh)
    clock = Interleave(hand)
    BenchTrainer(trainer_config(layout, sizes, total), callbacks=[clock]).fit()
    # trainer_steps[i] is step i + 2; the hand step run right after it is hand_steps[i + 1].
    first, second = clock.trainer_steps[warmup:], clock.hand_steps[warmup + 1 :]
    losses = ([float(x) for x in clock.losses], [float(x) for x in hand.losses])
    return Window(first, second, losses)


def hand_vs_hand(layout: str, sizes: Sizes, warmup: int, steps: int, mesh: Any) -> Window:
    """The control: two copies of the hand loop alternating step by step, timed alike."""
    total = warmup + steps
    one, two = HandLoop(layout, sizes, total, mesh), HandLoop(layout, sizes, total, mesh)
    first, second = [], []
    for _ in range(total):
        first.append(timed(one.step))
        second.append(timed(two.step))
    losses = ([float(x) for x in one.losses], [float(x) for x in two.losses])
    return Window(first[warmup:], second[warmup:], losses)


def blocks(steps: list[Stamp]) -> list[Stamp]:
    """Sums over consecutive runs of LOG_EVERY steps (a partial last run is dropped)."""
    out = []
    for start in range(0, len(steps) - LOG_EVERY + 1, LOG_EVERY):
        chunk = steps[start : start + LOG_EVERY]
        out.append((sum(w for w, _ in chunk), sum(c for _, c in chunk)))
    return out


def across_ranks(block_times: list[Stamp]) -> list[Stamp]:
    """Per block: the slowest rank's wall time (the job waits for it), all ranks' CPU time."""
    if not dist.is_initialized():
        return block_times
    walls = torch.tensor([w for w, _ in block_times], dtype=torch.float64)
    cpus = torch.tensor([c for _, c in block_times], dtype=torch.float64)
    dist.all_reduce(walls, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpus)
    return list(zip(walls.tolist(), cpus.tolist()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Comparison:
    """Blocks of both sides, pooled over windows: ((wall, CPU) seconds per block) per side."""

    first: list[Stamp]
    second: list[Stamp]

    def ratio(self, which: int = 0) -> float:
        """Median first block / median second block; ``which`` 0 = wall, 1 = CPU time."""
        a = statistics.median(b[which] for b in self.first)
        return a / statistics.median(b[which] for b in self.second)

    def spread(self) -> tuple[float, float]:
        """10th and 90th percentile of the per-block wall-time ratios."""
        paired = [a[0] / b[0] for a, b in zip(self.first, self.second)]
        return percentile(paired, 0.1), percentile(paired, 0.9)

    def ms_per_step(self, side: list[Stamp]) -> float:
        return statistics.median(b[0] for b in side) / LOG_EVERY * 1e3


def compare(
    pair: Callable[[], Window], rounds: int
) -> tuple[Comparison, tuple[list[float], list[float]]]:
    """``rounds`` windows of ``pair``; the blocks of all of them and the first one's losses."""
    comparison = Comparison([], [])
    losses: tuple[list[float], list[float]] = ([], [])
    for index in range(rounds):
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
        window = pair()
        if index == 0:
            losses = window.losses
        comparison.first.extend(across_ranks(blocks(window.first)))
        comparison.second.extend(across_ranks(blocks(window.second)))
    return comparison, losses


@dataclass
class Result:
    """One layout's trainer/hand comparison, its control and the loss check."""

    layout: str
    threads: int
    main: Comparison
    control: Comparison | None
    loss_diff: float  # max |trainer - hand| over the first window's micro-batch losses

    @property
    def ratio(self) -> float:
        return self.main.ratio()

    def row(self) -> str:
        low, high = self.main.spread()
        control = f"{self.control.ratio():.3f}" if self.control is not None else "-"
        return (
            f"| {self.layout:<6} | {self.threads:>7} | {self.main.ms_per_step(self.main.first):>10.2f} "
            f"| {self.main.ms_per_step(self.main.second):>7.2f} | {self.ratio:>5.3f} "
            f"| {self.main.ratio(1):>9.3f} | {low:.3f}-{high:.3f} | {control:>9} "
            f"| {len(self.main.first):>6} |"
        )


HEADER = (
    "| layout | threads | trainer ms | hand ms | ratio | cpu ratio | block ratios | A/A ratio "
    "| blocks |\n|--------|---------|------------|---------|-------|-----------|--------------"
    "|-----------|--------|"
)
LEGEND = """\
ms: median block of 10 optimizer steps, per step (wall time); ratio: trainer / hand of those
medians; cpu ratio: the same with the CPU time of all ranks; block ratios: 10th-90th
percentile of each block's trainer/hand (the noise); A/A ratio: the hand loop against a copy
of itself, measured the same way (what "no difference" reads as on this machine)"""


def measure(
    layout: str,
    sizes: Sizes,
    rounds: int,
    warmup: int,
    steps: int,
    mesh: Any = None,
    control: bool = True,
) -> Result:
    """``rounds`` interleaved trainer/hand windows (and as many hand/hand ones as control)."""
    if warmup < 1 or steps < LOG_EVERY or rounds < 1:
        raise ValueError(
            f"need warmup >= 1, steps >= {LOG_EVERY} (one block) and rounds >= 1, got "
            f"warmup={warmup}, steps={steps}, rounds={rounds}"
        )
    main, (trainer_losses, hand_losses) = compare(
        lambda: trainer_vs_hand(layout, sizes, warmup, steps, mesh), rounds
    )
    if len(trainer_losses) != len(hand_losses):
        raise RuntimeError(
            f"the trainer ran {len(trainer_losses)} micro-batches, the hand loop "
            f"{len(hand_losses)}: the loops did not take the same steps"
        )
    checked = None
    if control:
        checked, _ = compare(lambda: hand_vs_hand(layout, sizes, warmup, steps, mesh), rounds)
    diff = max(abs(a - b) for a, b in zip(trainer_losses, hand_losses))
    return Result(layout, torch.get_num_threads(), main, checked, diff)


def _rank_main(rank: int, layout: str, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    quiet()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        result = measure(
            layout, sizes_from(args), args.rounds, args.warmup, args.steps, mesh, args.control
        )
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
    parser.add_argument("--rounds", type=int, default=12, help="windows (fresh fit) per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per window")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per window")
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the hand loop against a copy of itself (the A/A ratio)",
    )
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
            yield measure(
                layout, sizes_from(args), args.rounds, args.warmup, args.steps, None, args.control
            )


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {sizes_from(args)}; accumulation "
        f"{ACCUM}; {args.rounds} windows of {args.warmup} untimed + {args.steps} timed steps; "
        f"load average {load_average()}",
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
    notes.append(f"load average at the end {load_average()}")
    print("\n".join(notes), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
