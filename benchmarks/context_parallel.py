"""Context parallelism on CPU ranks: saved activation memory per rank and step time at cp = 1, 2, 4.

Usage: ``python benchmarks/context_parallel.py [--cps 1 2 4] [--rotates allgather alltoall]``
(see benchmarks/README.md); ``--smoke`` is a tiny, fast run for the test suite.

What runs. For each context-parallel degree ``cp`` in ``--cps`` and, for ``cp > 1``, each rotate
method in ``--rotates``, the script spawns ``cp`` fresh CPU processes (gloo, ``OMP_NUM_THREADS=1``
and one intra-op thread each) and trains the Llama 3 model of ``examples/llama3`` (the ``debug``
shape: dim 256, 4 layers, 8 heads, 4 key/value heads, vocabulary 2048, with ``max_seq_len`` set
to ``--seq``) through ``DreamTrainer.fit()`` with ``context_parallel=cp``, no other parallelism,
AdamW and clipping at 1.0. Every step is one global batch of ``--batch`` sequences of ``--seq``
tokens (the same fixed random tokens in every run); the trainer cuts each sequence into
``2 x cp`` chunks and gives rank ``i`` chunks ``i`` and ``2cp - 1 - i`` (head-tail load balance),
so every rank holds ``seq / cp`` tokens, and the model's attention
(``context_parallel_attention``) spans the ranks: ``allgather`` gathers the keys and values of
the whole sequence on every rank; ``alltoall`` passes them around the ring one block at a time.
With ``cp > 1`` the trainer also shards parameters, gradients and optimizer state over the cp
ranks (FSDP2 over the ``dp_shard_cp`` mesh, as for any data-parallel rank), so a step includes
their all-gathers and reduce-scatters. ``cp = 1`` is one process with one thread and no
wrapper; it runs before the others and, except in ``--smoke``, again after them.

What is measured, per rank:

- *saved activations*: the bytes of the tensors autograd saves for backward during the forward
  of the first step (untimed), i.e. what is held from the end of forward to the start of
  backward. ``torch.autograd.graph.saved_tensors_hooks`` wraps the trainer's
  ``forward_backward`` of that step and keeps each packed tensor's storage; the benchmark's loss
  function, once it has computed the loss (the end of forward), sums the storages that still
  have bytes (``untyped_storage().nbytes()``), each once (by ``data_ptr``), so views and tensors
  saved twice count once. Not before then: FSDP frees a resharded block's gathered weights after
  its forward (autograd's reference then holds no bytes, and the address is reused). Parameters
  (``nn.Parameter``, FSDP's unsharded ones included, and views of them) and the model's buffers
  are weights, not activations: they are counted apart (*weights held*: at ``cp = 1`` every
  weight a matmul or norm saved; at ``cp > 1`` only those FSDP has not freed, the output head
  and final norm) and left out of *activations*. *attention*: the part saved inside
  ``context_parallel_attention`` (the benchmark wraps the name in ``examples.llama3.model``
  inside its own processes; the model and Dream Trainer are not changed); *other*: the rest.
  Reported: the largest rank (with load balance the ranks save the same bytes), its ratio to
  ``cp = 1`` and the ideal ``1 / cp``.
- *step*: a callback stamps ``time.perf_counter()`` at ``post_optimizer_zero_grad``; a step is
  the time between two stamps (data, sharding the batch, forward, loss, backward, FSDP's
  communication, gradient-norm all-reduce and clipping, AdamW, the trainer's bookkeeping and its
  loss all-reduce for logging). Reported: the median over the timed steps (after ``--warmup``
  untimed ones, the first of which carries the memory hooks) of the slowest rank's step, its
  ratio to the mean of the ``cp = 1`` runs, the tokens per second of the whole batch
  (``batch x seq / step``) and per rank (``/ cp``), and ``cpu/wall``: the thread CPU time of
  the timed steps over their wall time, mean over ranks (below 1: the rank waited for a peer in
  a collective, or for a core).

Same work: every run logs the training loss of every step (averaged over the cp ranks, as the
trainer logs it); each row shows the largest absolute difference from the first ``cp = 1`` run
over all steps, and the last line the largest over all rows. Weights change after every step, so
equal losses on later steps mean equal updates.

With more ranks than cores (``cp = 4`` on a 2-core machine) the ranks take turns on the cores and
wait for each other in every collective, so their step time measures the machine, not context
parallelism: those rows are marked ``oversubscribed``; compare step times where ``cp`` is at
most the core count. Memory does not depend on it. The 1-minute load average at the start of
each run is printed beside every row, and before and after the whole run.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a script: make `examples.llama3` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks import spawned_ranks
from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import (
    ContextParallelConfig,
    DeviceParameters,
    LoggingParameters,
    TrainingParameters,
)
from dream_trainer.trainer import Callback

Rotate = Literal["allgather", "alltoall"]
ROTATES: tuple[Rotate, ...] = ("allgather", "alltoall")
SMOKE_ROTATES: tuple[Rotate, ...] = ("allgather",)
SEED = 0
LR = 1e-3
CLIP = 1.0
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Model and batch shape; the defaults are the llama3 ``debug`` model at sequence 2048."""

    vocab: int = 2048
    dim: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    seq: int = 2048
    batch: int = 1

    def model_args(self) -> Any:
        from examples.llama3.configs import get_model_args

        return get_model_args(
            "debug",
            dim=self.dim,
            n_layers=self.layers,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_seq_len=self.seq,
        )


SMOKE_SIZES = Sizes(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, seq=64)


@dataclass(frozen=True)
class Job:
    """One launch: ``cp`` ranks (``rotate`` is unused at ``cp = 1``)."""

    cp: int
    rotate: Rotate
    sizes: Sizes
    warmup: int
    steps: int

    @property
    def label(self) -> str:
        return "cp=1" if self.cp == 1 else f"cp={self.cp} {self.rotate}"


# Saved-tensor accounting


class SavedBytes:
    """Storages autograd saves while ``counting()`` is active, by kind, summed by ``snapshot()``.

    The storages are kept until the snapshot, which counts the live ones, each once: FSDP frees
    a resharded block's unsharded weights after its forward (autograd's saved reference then
    has no bytes, and the address may be reused), so nothing is deduplicated before then.
    """

    def __init__(self) -> None:
        self.packed: list[tuple[torch.UntypedStorage, str]] = []
        self.bytes: dict[str, int] = {}
        self.tensors = 0
        self.active = False
        self.in_attention = 0
        self.buffers: set[int] = set()  # storages of the model's buffers (not activations)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        self.tensors += 1
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage: nothing to count
            return tensor
        base = tensor._base if tensor._base is not None else tensor
        weight = isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter)
        if weight or storage.data_ptr() in self.buffers:
            kind = "weights"
        else:
            kind = "attention" if self.in_attention else "other"
        self.packed.append((storage, kind))
        return tensor

    def snapshot(self) -> None:
        """Sum the live saved storages by kind (a storage saved twice counts once)."""
        if not self.active:
            return
        seen: dict[int, tuple[int, str]] = {}
        for storage, kind in self.packed:
            if storage.nbytes():
                seen.setdefault(storage.data_ptr(), (storage.nbytes(), kind))
        self.bytes = {kind: 0 for kind in ("attention", "other", "weights")}
        for size, kind in seen.values():
            self.bytes[kind] += size
        self.packed, self.active = [], False

    @contextmanager
    def counting(self, model: nn.Module) -> Iterator[None]:
        self.buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield
        finally:
            self.packed, self.active = [], False

    def wrap_attention(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.in_attention += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_attention -= 1

        return wrapper


SAVED = SavedBytes()


# The trainer


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token rows; labels are the next tokens."""

    def __init__(self, sizes: Sizes, rows: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, sizes.vocab, (rows, sizes.seq + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss; while counting, the end of forward: what autograd holds is summed here."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
    SAVED.snapshot()
    return loss


class BenchConfig(DreamTrainerConfig):
    sizes: Sizes = Sizes()


class ContextBenchTrainer(DreamTrainer):
    config: BenchConfig
    losses: list[float]

    def configure_models(self) -> None:
        from examples.llama3.model import Transformer

        self.model = Transformer(self.config.sizes.model_args())

    def init_weights(self) -> None:
        self.model.init_weights()

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        steps = self.config.training_parameters.max_steps
        assert steps is not None
        sizes = self.config.sizes
        # No data parallelism: every cp rank reads the whole batch; the trainer shards it.
        data = Tokens(sizes, steps * sizes.batch)
        return DataLoader(data, batch_size=sizes.batch, shuffle=False, drop_last=True), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        args = (self.model, batch["inputs"], batch["labels"], cross_entropy)
        if batch_idx == 0:  # the first (untimed) step measures what forward saves
            with SAVED.counting(self.model):
                loss = self.forward_backward(*args)
        else:
            loss = self.forward_backward(*args)
        self.step(self.optimizer)
        return {"loss": loss}

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.losses.append(float(metrics["train/loss"]))


class StepClock(Callback[DreamTrainer]):
    """Stamps wall and thread CPU time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def post_optimizer_zero_grad(self, optimizer: Any) -> None:
        self.stamps.append((time.perf_counter(), time.thread_time()))


def device_parameters(job: Job) -> DeviceParameters:
    if job.cp == 1:
        return DeviceParameters.SINGLE_DEVICE()
    return DeviceParameters(
        context_parallel=job.cp,
        dp_shard=1,
        context_parallel_config=ContextParallelConfig(rotate_method=job.rotate, load_balance=True),
    )


def train(job: Job, rank: int) -> dict[str, Any]:
    """Train on this rank; return its figures."""
    import examples.llama3.model as llama

    llama.context_parallel_attention = SAVED.wrap_attention(llama.context_parallel_attention)
    config = BenchConfig(
        seed=SEED,
        sizes=job.sizes,
        device_parameters=device_parameters(job),
        training_parameters=TrainingParameters(
            max_steps=job.warmup + job.steps, gradient_clip_val=CLIP
        ),
        logging_parameters=LoggingParameters(log_every_n_steps=1, backends=[]),
    )
    clock = StepClock()
    trainer = ContextBenchTrainer(config, callbacks=[clock])
    trainer.losses = []
    trainer.fit()
    stamps = clock.stamps
    if len(stamps) != job.warmup + job.steps:
        raise RuntimeError(f"expected {job.warmup + job.steps} optimizer steps, saw {len(stamps)}")
    pairs = list(itertools.pairwise(stamps[job.warmup - 1 :]))
    return {
        "rank": rank,
        "steps": [b[0] - a[0] for a, b in pairs],
        "cpu": [b[1] - a[1] for a, b in pairs],
        "losses": trainer.losses,
        "activations": SAVED.bytes["attention"] + SAVED.bytes["other"],
        "attention": SAVED.bytes["attention"],
        "weights": SAVED.bytes["weights"],
        "saved_tensors": SAVED.tensors,
    }


def launch(job: Job, timeout: float) -> list[dict[str, Any]] | str:
    """Run ``job`` on fresh processes; the per-rank results, or why there are none."""
    return spawned_ranks.launch(train, quiet, job, job.cp, timeout, prefix="cp-bench-")


# Figures


def step_ms(results: list[dict[str, Any]]) -> float:
    """Median over timed steps of the slowest rank's step, in ms."""
    return statistics.median(max(steps) for steps in zip(*(r["steps"] for r in results))) * 1e3


def loss_diff(results: list[dict[str, Any]], reference: list[float]) -> float:
    """Largest |loss - reference| over steps and ranks (inf when the step counts differ)."""
    diffs = [
        abs(a - b) if len(r["losses"]) == len(reference) else float("inf")
        for r in results
        for a, b in zip(r["losses"], reference)
    ]
    return max(diffs, default=float("inf"))


COLUMNS = (
    "run",
    "ranks/CPUs",
    "tokens/rank",
    "activations MiB/rank",
    "act. / cp=1",
    "ideal",
    "attention MiB/rank",
    "attn. / cp=1",
    "other MiB/rank",
    "weights held MiB",
    "step ms",
    "step / cp=1",
    "tokens/s",
    "tokens/s/rank",
    "cpu/wall",
    "max Δloss",
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
class Reference:
    """The cp = 1 figures the ratios divide by: saved bytes and losses of the first run, and the
    step times of every run."""

    activations: int = 0
    attention: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    step_ms: list[float] = dataclasses.field(default_factory=list)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.3f}" if reference else "n/a"


def result_row(
    label: str, job: Job, results: list[dict[str, Any]], ref: Reference, at: float
) -> str:
    cpus = os.cpu_count() or 1
    sizes = job.sizes
    activations = max(r["activations"] for r in results)
    attention = max(r["attention"] for r in results)
    ms = step_ms(results)
    tokens = sizes.batch * sizes.seq
    base_ms = statistics.mean(ref.step_ms) if ref.step_ms else 0.0
    cpu_wall = statistics.mean(sum(r["cpu"]) / sum(r["steps"]) for r in results)
    return table_row(
        {
            "run": label,
            "ranks/CPUs": f"{job.cp}/{cpus}" + (" oversubscribed" if job.cp > cpus else ""),
            "tokens/rank": str(tokens // job.cp),
            "activations MiB/rank": f"{activations / MIB:.2f}",
            "act. / cp=1": ratio(activations, ref.activations),
            "ideal": f"{1 / job.cp:.3f}",
            "attention MiB/rank": f"{attention / MIB:.2f}",
            "attn. / cp=1": ratio(attention, ref.attention),
            "other MiB/rank": f"{(activations - attention) / MIB:.2f}",
            "weights held MiB": f"{max(r['weights'] for r in results) / MIB:.2f}",
            "step ms": f"{ms:.0f}",
            "step / cp=1": ratio(ms, base_ms),
            "tokens/s": f"{tokens / ms * 1e3:.0f}",
            "tokens/s/rank": f"{tokens / job.cp / ms * 1e3:.0f}",
            "cpu/wall": f"{cpu_wall:.2f}",
            "max Δloss": f"{loss_diff(results, ref.losses):.1e}",
            "load": f"{at:.2f}",
        }
    )


LEGEND = """\
activations: bytes autograd saved for backward in the first step's forward (each storage once;
parameters and buffers left out), largest rank, MiB; act. / cp=1: over the cp=1 run; ideal: 1/cp.
attention: the part first saved inside context_parallel_attention; other: the rest (embedding,
norms, projections, MLP, RoPE, logits and loss). weights held: parameters autograd held at the
end of forward, not counted in activations (cp>1: FSDP has freed the blocks' gathered weights,
gathered again in backward). step ms: median over timed steps
of the slowest rank's optimizer step; step / cp=1: over the mean of the cp=1 runs. tokens/s:
the global batch's tokens per second; tokens/s/rank: divided by cp. cpu/wall: thread CPU time
over wall time in the timed steps, mean over ranks. max Δloss: largest absolute difference of
the logged per-step losses from the first cp=1 run. load: 1-minute load average at the start of
the row's run. oversubscribed: more ranks than CPUs, so the ranks take turns on the cores and
that row's step time measures the machine, not context parallelism (its memory is unaffected)."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parameter_count(sizes: Sizes) -> int:
    from examples.llama3.model import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(sizes.model_args()).parameters())


def quiet() -> None:
    # The trainer logs its layout at every launch; that is setup, not what is measured.
    logging.getLogger("dream_trainer").setLevel(logging.WARNING)


def load() -> float:
    return os.getloadavg()[0]


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4], metavar="CP")
    parser.add_argument("--rotates", nargs="+", default=list(ROTATES), choices=ROTATES)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="tiny model, cp 1 and 2, allgather")
    defaults = Sizes()
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field.name))
    if parser.parse_args(argv).smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(
            cps=[1, 2], rotates=list(SMOKE_ROTATES), warmup=1, steps=2, **vars(SMOKE_SIZES)
        )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("need --warmup >= 1 (the first step carries the memory hooks), --steps >= 1")
    if 1 not in args.cps or any(cp < 1 for cp in args.cps):
        parser.error("--cps must include 1 (the reference) and be positive")
    for cp in args.cps:
        if args.seq % (2 * cp):
            parser.error(f"--seq {args.seq} must be a multiple of 2 x cp = {2 * cp}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    started = time.monotonic()
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    cpus = os.cpu_count() or 1
    cps = sorted(set(args.cps))
    oversubscribed = [cp for cp in cps if cp > cpus]
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}\n"
        f"{cpu_model()}, {cpus} CPUs; cp = {', '.join(map(str, cps))} ranks, gloo, 1 thread per "
        "rank"
        + (
            f" (cp = {', '.join(map(str, oversubscribed))}: more ranks than CPUs, oversubscribed; "
            "their step times are not comparable, their memory is)"
            if oversubscribed
            else ""
        )
        + f"\n{sizes}: llama3 debug shape, {parameter_count(sizes) / 1e6:.2f} M parameters, "
        f"global batch {sizes.batch} x {sizes.seq} tokens; {args.warmup} untimed (the first "
        f"measures saved tensors) + {args.steps} timed steps per run\n"
        f"load average before (/proc/loadavg): {loadavg()}",
        flush=True,
    )

    def job(cp: int, rotate: Rotate) -> Job:
        return Job(cp, rotate, sizes, args.warmup, args.steps)

    def progress(what: str) -> None:
        print(f"{what} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    ref = Reference()
    done: list[tuple[str, Job, list[dict[str, Any]], float]] = []
    failed: list[str] = []

    def run(label: str, this: Job) -> None:
        at = load()
        outcome = launch(this, args.timeout)
        if isinstance(outcome, str):
            failed.append(table_row({"run": label, "step ms": f"failed: {outcome}"}))
            progress(f"{label}: FAILED: {outcome}")
            return
        if this.cp == 1:
            if not ref.losses:
                ref.activations = max(r["activations"] for r in outcome)
                ref.attention = max(r["attention"] for r in outcome)
                ref.losses = outcome[0]["losses"]
            ref.step_ms.append(step_ms(outcome))
        done.append((label, this, outcome, at))
        progress(f"{label}: done")

    run("cp=1 (run 1)", job(1, args.rotates[0]))
    for cp in (c for c in cps if c > 1):
        for rotate in args.rotates:
            this = job(cp, rotate)
            run(this.label, this)
    if not args.smoke:
        run("cp=1 (run 2)", job(1, args.rotates[0]))

    rows = [result_row(label, this, results, ref, at) for label, this, results, at in done]
    diffs = [loss_diff(results, ref.losses) for _, this, results, _ in done if this.cp > 1]
    print(LEGEND, HEADER, *rows, *failed, sep="\n")
    steps = len(ref.losses)
    if diffs:
        print(
            f"losses: max |loss - loss at cp=1| over {steps} steps and {len(diffs)} cp>1 runs: "
            f"{max(diffs):.1e} (first-step loss at cp=1: {ref.losses[0]:.6f})"
        )
    print(
        f"load average after (/proc/loadavg): {loadavg()}; wall time "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
