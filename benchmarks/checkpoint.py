"""Checkpoint save and load throughput, sync against async, beside the disk's own speed.

Usage: ``python benchmarks/checkpoint.py [--size-gb 1] [--repeats 3] [--dir PATH]`` (see
benchmarks/README.md); ``--smoke`` is a tiny, fast run for the test suite.

What runs. One process (world size 1: the trainer's own single-process gloo group, no
launcher) builds a ``DreamTrainer`` whose model is a stack of square ``nn.Linear`` layers
(``--width`` wide, as many as make ``--size-gb`` GB of fp32 weights and biases; GB = 1e9 bytes),
frozen, plus one trainable scalar that the optimizer (SGD) holds, so a checkpoint is the weights.
(A stateless optimizer over all the weights would make torch build its state at every save, by
allocating zero gradients and stepping; that cost is timed once and shown in a note.)
``checkpoint_parameters.enable`` makes the trainer set up its real
:class:`~dream_trainer.trainer.checkpointing.checkpointer.Checkpointer`; the measurements run in place of
the training loop (after ``setup``, before ``teardown``), and every save goes through
``Checkpointer.save`` (state dicts, ``trainer.json`` and ``rank_0.json``, DCP, then the commit:
rename, ``COMPLETE.json``, fsync of the directory) and every load through
``trainer.load_checkpoint`` (the key report, DCP into the existing model, the rest of the
state). Everything is written under ``--dir`` (default: the system temporary directory) in a
fresh directory that is deleted at the end, also on an error.

Durability, stated plainly: the Checkpointer passes ``FileSystemWriter(sync_files=True)`` (also
DCP's default), so DCP ``os.fsync``-s its data file and ``.metadata`` before the commit, and
the commit fsyncs the directory after the rename. A save is timed until all of that returned.
The disk rows use the same rule: plain ``write`` calls then one ``os.fsync`` before the clock
stops.

What is timed, in each round (``--repeats`` rounds; the table shows medians):

- *disk write + fsync*: the model's bytes (every parameter tensor's raw memory, in order)
  written to one new file in the same directory with unbuffered ``write`` calls, then
  ``fsync`` and ``close``: the physical write limit the saves are compared with.
- *disk read*: that file read back with ``readinto`` straight into the model's parameters (the
  same bytes, so the model is unchanged), twice: right after the write, from the page cache;
  and after ``posix_fadvise(POSIX_FADV_DONTNEED)`` dropped the file's pages from the page cache
  ("evicted"). On a virtual machine the host may still cache the disk image, so an evicted read
  can be faster than the physical disk; compare it with the cached read to see.
- *save sync*: ``Checkpointer.save(..., async_mode="off")``, call to return (it returns when the
  checkpoint is durable and committed). Blocked = total.
- *save async thread / process*: ``Checkpointer.save(..., async_mode=...)``. *blocked* is the
  time a training loop is held: the call until it returns (state dicts, the JSON files,
  starting DCP's background staging copy of every tensor into CPU memory the stager reuses from
  save to save, and for ``process`` handing the request to torch's background saver process),
  plus, after one stand-in step that overlaps the copy, the wait in
  ``Checkpointer.wait_for_staging()``, which the trainer calls before the next optimizer step
  changes the parameters. Then the benchmark plays the training loop: it runs "steps"
  (``--step-dim`` square fp32 matmuls on the main thread) and calls ``Checkpointer.poll()``
  after each, as the trainer does after every step, until the checkpoint's ``COMPLETE.json``
  exists. *total* is the call until then (to within one step).
  ``step busy/idle`` is the median step time during the background write over the median of
  steps run just before the save, on the same thread: how much the background work slows the
  loop once control is back.
- *load*: ``trainer.load_checkpoint(path)`` of the round's last checkpoint into the existing
  model, after a few weights were overwritten (the load must restore them; it is checked),
  first with the checkpoint's files evicted from the page cache, then again from the cache.

Before the rounds, one process-mode save is run untimed and shown in a note: its first call
starts torch's background saver process (a spawned Python that imports torch and joins a gloo
group of its own), which the later saves reuse. Rounds alternate the order of the disk write
and the three saves (forward, then backward, ...) so that drift on a shared machine hits them
alike; a round keeps only its newest checkpoint (for the loads) and deletes it at its end, so
at most two model sizes are on disk at a time (a checkpoint and the disk file). The free space under ``--dir`` must be at least three times the
model's size or the script refuses to start.

Columns: median seconds; GB/s (model bytes over that time; async: over the total); ``/ disk``
(save GB/s over disk write + fsync GB/s; load GB/s over the disk read in the same cache state);
blocked seconds and ``blocked/sync`` (the target is below 0.10); ``step busy/idle``; the
seconds of every run; the 1-minute load average at the start of the median run's round. The
load average before and after is printed too, and the free disk space before the run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.trainer.checkpointing.optimizer_state import optimizer_state_dict
from dream_trainer.trainer.checkpointing.storage import COMPLETE

GB = 1e9
TARGET = 0.10  # async blocked / sync save time the async modes should stay under
SPACE_FACTOR = 3  # free space needed, in model sizes
ASYNC_MODES = ("thread", "process")
SAVES = ("disk", "off", *ASYNC_MODES)
IDLE_STEPS = 10


@dataclass(frozen=True)
class Sizes:
    """The model: ``layers`` square linear layers of ``width`` (weights and biases, fp32)."""

    width: int
    layers: int

    @classmethod
    def for_gb(cls, size_gb: float, width: int) -> Sizes:
        per_layer = (width * width + width) * 4
        return cls(width, max(1, round(size_gb * GB / per_layer)))

    @property
    def parameters(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @property
    def bytes(self) -> int:
        return self.parameters * 4


class Stack(nn.Module):
    """``layers`` frozen linear layers and one trainable scalar; never run, only saved and loaded.

    The layers are frozen so that the optimizer, over the scalar, stays tiny: a checkpoint is
    the weights (see :meth:`Bench.stateless_optimizer_note` for why not SGD over everything).
    """

    def __init__(self, sizes: Sizes) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(sizes.width, sizes.width) for _ in range(sizes.layers)
        )
        self.layers.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x * self.scale

    def init_weights(self) -> None:
        # Random values: nothing on the way to the disk can compress them.
        with torch.no_grad():
            for parameter in self.layers.parameters():
                parameter.uniform_(-0.01, 0.01)
            self.scale.fill_(1.0)


class BenchConfig(DreamTrainerConfig):
    width: int = 4096
    layers: int = 15


# ------------------------------------------------------------------------ measurements


@dataclass
class Figures:
    """Seconds of each run of one row, with the load average at the start of its round."""

    seconds: list[float] = field(default_factory=list)
    blocked: list[float] = field(default_factory=list)
    busy_idle: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    copy: list[float] = field(default_factory=list)

    def add(
        self, seconds: float, load: float, blocked: float | None = None, busy: float | None = None
    ) -> None:
        self.seconds.append(seconds)
        self.loads.append(load)
        if blocked is not None:
            self.blocked.append(blocked)
        if busy is not None:
            self.busy_idle.append(busy)

    def median(self) -> float:
        return statistics.median(self.seconds)

    def median_load(self) -> float:
        """The load average of the median run (the lower middle run of an even count)."""
        order = sorted(range(len(self.seconds)), key=lambda i: self.seconds[i])
        return self.loads[order[(len(order) - 1) // 2]]


ROWS = (
    ("disk write + fsync", "disk"),
    ("disk read, page cache", "read cached"),
    ("disk read, evicted", "read evicted"),
    ("save sync (async_mode=off)", "off"),
    ("save async thread", "thread"),
    ("save async process", "process"),
    ("load, evicted", "load evicted"),
    ("load, page cache", "load cached"),
)


class Bench:
    """The measurements, run by :class:`CheckpointBenchTrainer` in place of training."""

    def __init__(self, trainer: CheckpointBenchTrainer, args: argparse.Namespace) -> None:
        assert trainer._checkpointer is not None, "checkpoint_parameters.enable must be set"
        self.trainer = trainer
        self.checkpointer = trainer._checkpointer
        self.args = args
        self.overlap_seconds = args.overlap_seconds
        self.root = Path(trainer.config.run_dir).parent  # the benchmark's scratch directory
        self.figures = {key: Figures() for _, key in ROWS}
        self.notes: list[str] = []
        self.checkpoint_bytes = 0
        self.tensors = [p.detach() for p in trainer.model.layers.parameters()]
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors)
        generator = torch.Generator().manual_seed(0)
        dim = args.step_dim
        self.step_inputs = (
            torch.randn(dim, dim, generator=generator),
            torch.randn(dim, dim, generator=generator),
        )

    # A training loop's stand-in

    def step(self) -> float:
        start = time.perf_counter()
        a, b = self.step_inputs
        torch.mm(a, b)
        return time.perf_counter() - start

    def idle_step_seconds(self) -> float:
        for _ in range(3):  # warm up
            self.step()
        return statistics.median(self.step() for _ in range(IDLE_STEPS))

    # Disk

    def disk_round(self, load: float) -> None:
        path = self.root / "disk-speed.bin"
        try:
            start = time.perf_counter()
            with open(path, "wb", buffering=0) as file:
                for tensor in self.tensors:
                    view = tensor.numpy().data.cast("B")
                    while view:
                        view = view[file.write(view) :]
                file.flush()
                os.fsync(file.fileno())
            self.figures["disk"].add(time.perf_counter() - start, load)
            self.figures["read cached"].add(self.read_back(path), load)
            evict(path)
            self.figures["read evicted"].add(self.read_back(path), load)
        finally:
            path.unlink(missing_ok=True)

    def read_back(self, path: Path) -> float:
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as file:
            for tensor in self.tensors:
                view = tensor.numpy().data.cast("B")
                while view:
                    got = file.readinto(view)
                    if not got:
                        raise RuntimeError(f"{path} is shorter than the model")
                    view = view[got:]
        return time.perf_counter() - start

    # Checkpoints

    def save(self, mode: str, root: Path, load: float | None) -> tuple[Path, float, float]:
        """One save under ``root``; (checkpoint, blocked s, total s). ``load=None``: untimed."""
        idle = self.idle_step_seconds() if mode != "off" else 0.0
        start = time.perf_counter()
        final = self.checkpointer.save(root, {}, mode)
        blocked = time.perf_counter() - start
        busy = []
        copy = 0.0
        if mode != "off":
            # The next step's forward and backward (--overlap-seconds of stand-in steps) overlap
            # the background staging copy; its optimizer step must wait for the copy, as the
            # trainer's step() does: that wait is held time too.
            returned = time.perf_counter()
            copied: list[float] = []
            staging = self.checkpointer._staging
            if staging is not None:
                staging.add_done_callback(lambda _: copied.append(time.perf_counter()))
            while time.perf_counter() - returned < self.overlap_seconds:
                busy.append(self.step())
            waited = time.perf_counter()
            self.checkpointer.wait_for_staging()
            blocked += time.perf_counter() - waited
            copy = (copied[0] if copied else time.perf_counter()) - returned
        while not (final / COMPLETE).exists():
            busy.append(self.step())
            self.checkpointer.poll()
        total = time.perf_counter() - start
        if load is not None:
            ratio = statistics.median(busy) / idle if busy and idle else None
            self.figures[mode].add(total, load, blocked=blocked, busy=ratio)
            if mode != "off":
                self.figures[mode].copy.append(copy)
        return final, blocked, total

    def load_round(self, path: Path, load: float) -> None:
        for key, cached in (("load evicted", False), ("load cached", True)):
            if not cached:
                for file in path.iterdir():
                    evict(file)
            # Overwrite a few weights; the load has to bring the saved values back.
            first = self.tensors[0]
            saved = first[:4].clone()
            with torch.no_grad():
                first[:4].fill_(math.nan)
            start = time.perf_counter()
            self.trainer.load_checkpoint(path)
            seconds = time.perf_counter() - start
            if not torch.equal(first[:4], saved):
                raise RuntimeError(f"load_checkpoint({path}) did not restore the weights")
            self.figures[key].add(seconds, load)
        if not self.checkpoint_bytes:
            files = [f for f in path.iterdir() if f.is_file()]
            self.checkpoint_bytes = sum(f.stat().st_size for f in files)
            self.notes.append(
                f"a checkpoint on disk: {self.checkpoint_bytes / GB:.4f} GB in {len(files)} "
                f"files ({', '.join(sorted(f.name for f in files))}); the model's tensors: "
                f"{self.bytes / GB:.4f} GB"
            )

    def stateless_optimizer_note(self) -> None:
        """Time the framework's optimizer state dict of a stateless SGD over all the weights.

        torch's ``get_optimizer_state_dict`` builds a missing state by giving every trainable
        parameter a zero gradient and stepping once (the framework then clears the state again,
        so it happens at every save); the benchmark's optimizer avoids that, a plain SGD over
        every weight would not.
        """
        layers = self.trainer.model.layers
        layers.requires_grad_(True)
        try:
            optimizer = torch.optim.SGD(layers.parameters(), lr=0.0)
            start = time.perf_counter()
            optimizer_state_dict(layers, optimizer)
            seconds = time.perf_counter() - start
        finally:
            layers.requires_grad_(False)
            for parameter in layers.parameters():
                parameter.grad = None
        self.notes.append(
            f"not in the table: a stateless optimizer (SGD without momentum) over all the "
            f"weights would add {seconds:.2f} s to every save's blocked time (torch builds its "
            "missing state with zero gradients and one step, each save again)"
        )

    def run(self) -> None:
        self.stateless_optimizer_note()
        _, blocked, total = self.save("process", self.root / "warmup", load=None)
        shutil.rmtree(self.root / "warmup")
        self.notes.append(
            f"first async process save (untimed; starts torch's saver process): blocked "
            f"{blocked:.2f} s, total {total:.2f} s"
        )
        for index in range(self.args.repeats):
            order = SAVES if index % 2 == 0 else SAVES[::-1]
            load = os.getloadavg()[0]
            last: Path | None = None
            for kind in order:
                if kind == "disk":
                    self.disk_round(load)
                    continue
                if last is not None:  # keep only the newest checkpoint (for the loads)
                    shutil.rmtree(last.parent)
                last, _, _ = self.save(kind, self.root / f"round{index}-{kind}", load)
            assert last is not None
            self.load_round(last, load)
            shutil.rmtree(last.parent)
            progress(f"round {index + 1} of {self.args.repeats} done")


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the trainer


class CheckpointBenchTrainer(DreamTrainer):
    """Sets up the model, the optimizer and the Checkpointer; ``fit`` runs :class:`Bench`."""

    config: BenchConfig
    bench_args: argparse.Namespace
    bench: Bench | None = None

    def configure_models(self) -> None:
        self.model = Stack(Sizes(self.config.width, self.config.layers))

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.SGD([self.model.scale], lr=0.0)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1), None

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        raise AssertionError("the checkpoint benchmark never trains")

    def _fit_loop(self) -> None:
        # In place of training (and of the final save of CheckpointMixin._fit_loop).
        self.bench = Bench(self, self.bench_args)
        self.bench.run()


# ------------------------------------------------------------------------------ report

COLUMNS = (
    "operation",
    "median s",
    "GB/s",
    "/ disk",
    "blocked s",
    "blocked/sync",
    "copy s",
    "step busy/idle",
    "runs s",
    "load",
)
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)

LEGEND = """\
median s: median over rounds (async saves: call to COMPLETE.json, with the loop stepping and
polling meanwhile). GB/s: model bytes (1e9) / median s. / disk: saves over disk write + fsync,
loads over the disk read in the same page-cache state. blocked s: median time in
Checkpointer.save plus the wait for its staging copy before the next optimizer step, after a
next step of --overlap-seconds (sync: the whole save). blocked/sync: that over the median sync
save (target < 0.10). copy s: the background staging copy, from the call's return; blocked
grows once a step is shorter than it. step busy/idle: median matmul step during the background
write over the median just before it. runs s: every round's time. load: 1-minute load average
at the start of the median run's round."""


def table_row(cells: dict[str, str]) -> str:
    return "| " + " | ".join(cells.get(c, "") for c in COLUMNS) + " |"


def report(bench: Bench) -> tuple[list[str], list[str]]:
    figures, size = bench.figures, bench.bytes / GB
    speed = {key: size / f.median() for key, f in figures.items() if f.seconds}
    # A sync save holds the loop for all of it: its blocked time is the reference.
    sync = statistics.median(figures["off"].blocked)
    reference = {
        "off": "disk",
        "thread": "disk",
        "process": "disk",
        "load evicted": "read evicted",
        "load cached": "read cached",
    }
    rows, notes = [], list(bench.notes)
    for label, key in ROWS:
        f = figures[key]
        cells = {
            "operation": label,
            "median s": f"{f.median():.3f}",
            "GB/s": f"{speed[key]:.3f}",
            "/ disk": f"{speed[key] / speed[reference[key]]:.3f}" if key in reference else "",
            "runs s": ", ".join(f"{s:.3f}" for s in f.seconds),
            "load": f"{f.median_load():.2f}",
        }
        if key in ("off", *ASYNC_MODES):
            blocked = statistics.median(f.blocked)
            cells["blocked s"] = f"{blocked:.3f}"
            cells["blocked/sync"] = f"{blocked / sync:.3f}"
            if f.copy:
                cells["copy s"] = f"{statistics.median(f.copy):.3f}"
        if f.busy_idle:
            cells["step busy/idle"] = f"{statistics.median(f.busy_idle):.2f}"
        rows.append(table_row(cells))
    for mode in ASYNC_MODES:
        ratio = statistics.median(figures[mode].blocked) / sync
        verdict = "met" if ratio < TARGET else "NOT met"
        notes.append(f"async {mode}: blocked/sync {ratio:.3f} (target < {TARGET:.2f}: {verdict})")
    return rows, notes


# --------------------------------------------------------------------------------- main


def filesystem_of(path: Path) -> str:
    """``device type`` of the mount holding ``path`` (from /proc/mounts), or ``unknown``."""
    best, found = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return found
    resolved = str(path.resolve())
    for line in lines:
        device, mount, kind, *_ = line.split()
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, found = mount, f"{device} {kind}, mounted at {mount}"
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


STARTED = [time.monotonic()]  # reset by main()


def progress(what: str) -> None:
    print(f"{what} ({time.monotonic() - STARTED[0]:.0f} s)", file=sys.stderr, flush=True)


@contextmanager
def scratch_directory(parent: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dream-ckpt-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_saver_process() -> None:
    """End torch's background saver process (started by the first async process save), so a
    second run in this process starts its own, and none outlives the benchmark."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as executor
    except ImportError:  # pragma: no cover
        return
    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        process.__del__()  # sends TERMINATE and joins (what torch does when it is collected)


def quiet() -> None:
    # Setup logs (layout, run directory, "resumed from") are not what is measured.
    logging.getLogger("dream_trainer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="model size in GB (1e9 B)")
    parser.add_argument("--width", type=int, default=4096, help="width of each linear layer")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians are shown)")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--overlap-seconds",
        type=float,
        default=0.5,
        help="forward+backward time of the step after a save, which the staging copy overlaps",
    )
    parser.add_argument(
        "--step-dim", type=int, default=512, help="size of the matmul a loop step runs"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 round")
    if parser.parse_args(argv).smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(size_gb=0.002, width=128, repeats=1, step_dim=64, overlap_seconds=0.05)
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.width < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("need --size-gb > 0, --width >= 1, --repeats >= 1 and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    STARTED[0] = time.monotonic()
    quiet()
    torch.set_num_threads(args.threads)
    sizes = Sizes.for_gb(args.size_gb, args.width)
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}\n"
        f"{cpu_model()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)\n"
        f"model: {sizes.layers} x Linear({sizes.width}, {sizes.width}), "
        f"{sizes.parameters / 1e6:.1f} M fp32 parameters = {sizes.bytes / GB:.3f} GB; "
        f"layers frozen, SGD over one scalar; {args.repeats} round(s)\n"
        f"directory {args.dir} ({filesystem_of(args.dir)}): {free / GB:.1f} GB free\n"
        f"load average before: {loadavg()}",
        flush=True,
    )
    needed = SPACE_FACTOR * sizes.bytes
    if free < needed:
        raise SystemExit(
            f"not enough free disk space under {args.dir}: {free / GB:.2f} GB free, the "
            f"benchmark needs {needed / GB:.2f} GB ({SPACE_FACTOR} x the model); give --dir "
            "on a larger disk or a smaller --size-gb"
        )
    with scratch_directory(args.dir) as scratch:
        config = BenchConfig(
            width=sizes.width,
            layers=sizes.layers,
            run_dir=str(scratch / "runs"),
            device_parameters=DeviceParameters.SINGLE_DEVICE(),
            training_parameters=TrainingParameters(n_epochs=1),
            logging_parameters=LoggingParameters(backends=[]),
            checkpoint_parameters={"enable": True, "resume": "never"},
        )
        trainer = CheckpointBenchTrainer(config)
        trainer.bench_args = args
        try:
            trainer.fit()
        finally:
            stop_saver_process()
        assert trainer.bench is not None
        rows, notes = report(trainer.bench)
    print(LEGEND, HEADER, *rows, *notes, sep="\n")
    print(
        f"load average after: {loadavg()}; wall time {time.monotonic() - STARTED[0]:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
