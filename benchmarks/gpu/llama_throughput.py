"""Llama 3 training throughput on one device: Dream Trainer against a hand-written PyTorch loop.

    bash benchmarks/gpu/prepare_wheels.sh              # here: wheels the GPU image lacks
    bash benchmarks/gpu/run_llama_throughput.sh        # there: installs them, runs this script
    python benchmarks/gpu/llama_throughput.py --smoke  # any machine: tiny model on the CPU

For each variant (eager; ``torch.compile`` per block; compile + float8 through torchao) the same
model, data, initial weights and settings are trained by ``DreamTrainer.fit()`` and by a plain
loop (the model built on meta, ``to_empty``, ``init_weights``, FSDP2 ``fully_shard`` per block
on a one-rank mesh for bf16 mixed precision exactly as the trainer applies it, fused AdamW, the
loss's ``.item()`` every 10 steps), alternately. A run times ``--steps`` optimizer steps after
``--warmup`` untimed ones, between two device synchronizations. Printed per run: tokens/s, MFU
(the model's ``flops_per_token`` x tokens/s over the device's dense bf16 peak), the peak of
``torch.cuda.max_memory_allocated`` against the planner's prediction where the planner exists,
and per variant the ratio trainer / hand-written of the step time (goal at most 1.01). torchtitan,
if importable, is run last on the same model shape (``--torchtitan-args``; best effort).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `dream_trainer`, `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.trainer import Callback
from examples.llama3.configs import get_model_args
from examples.llama3.model import Transformer

VARIANTS = ("eager", "compile", "compile+float8")
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H200 (SXM), as the vendor states it
LR = 3e-4


@dataclass(frozen=True)
class Shape:
    model: str
    seq_len: int
    batch_size: int
    overrides: tuple[tuple[str, Any], ...] = ()

    def args(self) -> Any:
        return get_model_args(self.model, max_seq_len=self.seq_len, **dict(self.overrides))


@dataclass
class Run:
    loop: str
    variant: str
    seconds_per_step: float
    tokens_per_step: int
    flops_per_token: float
    peak_bytes: int | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.seconds_per_step


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences: the same for both loops, no tokenizer or files needed."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.tokens[i]
        return {"input_ids": row[:-1], "labels": row[1:]}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


def to_float8(model: nn.Module) -> nn.Module:
    """torchao's float8 training linears, except the output head and non-multiple-of-16 shapes."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(module: nn.Module, name: str) -> bool:
        if name == "output" or not isinstance(module, nn.Linear):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    return convert_to_float8_training(model, config=config, module_filter_fn=wanted)


def float8_available(device: torch.device) -> str | None:
    """Why float8 cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'dream-trainer[fp8]')"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "float8 matmuls need an SM 8.9+ GPU"
    return None


# ----------------------------------------------------------------------------- the trainer


class BenchConfig(DreamTrainerConfig):
    model: str = "1B"
    seq_len: int = 2048
    batch_size: int = 4
    overrides: dict[str, Any] = {}
    float8: bool = False


class BenchTrainer(DreamTrainer):
    config: BenchConfig

    def configure_models(self) -> None:
        cfg = self.config
        shape = Shape(cfg.model, cfg.seq_len, cfg.batch_size, tuple(cfg.overrides.items()))
        self.model = Transformer(shape.args())
        if cfg.float8:
            self.model = to_float8(self.model)

    def transformer_shape(self) -> Any:
        """The shape the planner's activation estimate needs."""
        cfg = self.config
        args = Shape(cfg.model, cfg.seq_len, cfg.batch_size, tuple(cfg.overrides.items())).args()
        return args.transformer_shape(cfg.seq_len, cfg.batch_size)

    def configure_optimizers(self) -> None:
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=fused)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        cfg = self.config
        steps = cfg.training_parameters.max_steps or 1
        data = RandomTokens(steps * cfg.batch_size, cfg.seq_len, self.model.args.vocab_size)
        return DataLoader(
            data, batch_size=cfg.batch_size, pin_memory=self.device.type == "cuda"
        ), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss = self.forward_backward(
            self.model, batch["input_ids"], batch["labels"], next_token_loss
        )
        self.step(self.optimizer)
        return {"loss": loss}


class Stopwatch(Callback[DreamTrainer]):
    """Synchronizes and reads the clock after the warmup steps and after the last step."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.count = 0
        self.start = self.stop = 0.0

    def post_optimizer_zero_grad(self, optimizer: Any) -> None:
        self.count += 1
        if self.count in (self.warmup, self.warmup + self.steps):
            synchronize(self.trainer.device)
            now = time.perf_counter()
            if self.count == self.warmup:
                self.start = now
            else:
                self.stop = now


def bench_config(shape: Shape, variant: str, args: argparse.Namespace) -> BenchConfig:
    precision = {"param_dtype": "bfloat16", "reduce_dtype": "float32"} if args.bf16 else {}
    return BenchConfig(
        seed=0,
        model=shape.model,
        seq_len=shape.seq_len,
        batch_size=shape.batch_size,
        overrides=dict(shape.overrides),
        float8=variant.endswith("float8"),
        device_parameters=DeviceParameters.SINGLE_DEVICE(
            compile_model=variant.startswith("compile"),
            checkpoint_activations=args.checkpoint_activations,
            **precision,
        ),
        training_parameters=TrainingParameters(max_steps=args.warmup + args.steps),
        logging_parameters=LoggingParameters(
            backends=[], progress_bar=False, log_every_n_steps=10, performance_metrics=False
        ),
    )


def trainer_run(shape: Shape, variant: str, device: torch.device, args: argparse.Namespace) -> Run:
    config = bench_config(shape, variant, args)
    watch = Stopwatch(args.warmup, args.steps)
    reset_peak(device)
    trainer = BenchTrainer(config, callbacks=[watch], device=device)
    trainer.fit()
    per_step = (watch.stop - watch.start) / args.steps
    tokens = shape.batch_size * shape.seq_len
    return Run("trainer", variant, per_step, tokens, _flops(shape), peak(device))


# ----------------------------------------------------------------------------- the hand loop


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[Any]:
    """A one-rank process group and mesh, as FSDP2 needs even on one device."""
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh(device.type, (1,))
    finally:
        dist.destroy_process_group()


def hand_run(shape: Shape, variant: str, device: torch.device, args: argparse.Namespace) -> Run:
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    reset_peak(device)
    with one_rank_group(device) as mesh:
        with torch.device("meta"):
            model = Transformer(shape.args())
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights(buffer_device=device)  # on plain tensors, before sharding
        if variant.endswith("float8"):
            model = to_float8(model)
        blocks = list(
            model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
        )
        for block in blocks:  # the trainer's order: activation checkpointing, compile, FSDP
            if args.checkpoint_activations:
                checkpoint(block)
            if variant.startswith("compile"):
                block.compile()
        if args.bf16:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
        total = args.warmup + args.steps
        data = RandomTokens(total * shape.batch_size, shape.seq_len, shape.args().vocab_size)
        loader = DataLoader(data, batch_size=shape.batch_size, pin_memory=device.type == "cuda")
        start = 0.0
        for step, batch in enumerate(loader, start=1):
            inputs = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            loss = next_token_loss(model(inputs), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0:
                loss.item()
            if step == args.warmup:
                synchronize(device)
                start = time.perf_counter()
        synchronize(device)
        per_step = (time.perf_counter() - start) / args.steps
    return Run(
        "hand", variant, per_step, shape.batch_size * shape.seq_len, _flops(shape), peak(device)
    )


# ----------------------------------------------------------------------------- helpers


def _flops(shape: Shape) -> float:
    from examples.llama3.model import flops_per_token

    return float(flops_per_token(shape.args(), shape.seq_len))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def predicted_peak(shape: Shape, args: argparse.Namespace) -> int | None:
    """The planner's device bytes for the trainer's eager run (``dream-trainer plan``)."""
    from dream_trainer.launch import plan_layout

    config = bench_config(shape, "eager", args)
    try:
        plan = plan_layout(lambda: BenchTrainer(config), world_size=1, devices_per_node=1)
    except Exception as error:  # a prediction is extra; the measurement stands alone
        print(f"planner: no prediction ({type(error).__name__}: {error})", flush=True)
        return None
    return plan.worst.memory.total


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given * 1e12
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return H200_BF16_PEAK
    from dream_trainer.trainer.flops import peak_flops_for

    return peak_flops_for(device)


def torchtitan_row(args: argparse.Namespace) -> str:
    """torchtitan on the same shape, if it is importable (it needs its own assets: best effort)."""
    if importlib.util.find_spec("torchtitan") is None:
        return "torchtitan: not installed (prepare_wheels.sh --torchtitan adds its wheel)"
    cmd = [sys.executable, "-m", "torchtitan.train", *args.torchtitan_args.split()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torchtitan_timeout)
    except subprocess.TimeoutExpired:
        return f"torchtitan: timed out after {args.torchtitan_timeout} s"
    rates = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if "tps:" in line:
            with contextlib.suppress(ValueError, IndexError):
                rates.append(float(line.split("tps:")[1].split()[0].replace(",", "")))
    if proc.returncode != 0 or not rates:
        tail = (proc.stderr or proc.stdout)[-800:]
        return f"torchtitan: no tokens/s found (exit {proc.returncode}); output tail:\n{tail}"
    return f"torchtitan: median {statistics.median(rates[len(rates) // 2 :]):,.0f} tokens/s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="1B", help="a llama3 config name (examples/llama3)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, TFLOP/s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torchtitan-args", default="--model.name llama3 --model.flavor 1B")
    parser.add_argument("--torchtitan-timeout", type=float, default=180.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.seq, args.batch, args.steps, args.warmup = "debug", 32, 2, 2, 1
        args.bf16 = False
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("WANDB_MODE", "disabled")
    overrides: tuple[tuple[str, Any], ...] = ()
    if args.smoke:
        overrides = (("dim", 64), ("n_layers", 2), ("n_heads", 4), ("n_kv_heads", 2))
        overrides += (("multiple_of", 32), ("vocab_size", 512))
    shape = Shape(args.model, args.seq, args.batch, overrides)
    peak_flop = peak_flops(device, args.peak_tflops)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"llama3 {args.model}: seq {args.seq}, batch {args.batch}, bf16 {args.bf16}, "
          f"AC {args.checkpoint_activations}; {args.warmup} + {args.steps} steps per run on "
          f"{device} (torch {torch.__version__}); load average {load:.2f}", flush=True)  # fmt: skip
    header = f"{'variant':<16}{'loop':<9}{'ms/step':>9}{'tokens/s':>12}{'MFU':>7}{'peak GiB':>10}"
    print(header + f"{'predicted':>11}", flush=True)
    predicted = predicted_peak(shape, args)
    failed = 0
    for variant in args.variants:
        why_not = float8_available(device) if variant.endswith("float8") else None
        if why_not is not None:
            print(f"{variant:<16}skipped: {why_not}", flush=True)
            continue
        runs: dict[str, Run] = {}
        for loop in ("trainer", "hand"):
            try:
                run = (trainer_run if loop == "trainer" else hand_run)(shape, variant, device, args)
            except Exception as error:
                print(f"{variant:<16}{loop:<9}failed: {type(error).__name__}: {error}", flush=True)
                failed += 1
                continue
            runs[loop] = run
            mfu = (
                f"{run.flops_per_token * run.tokens_per_second / peak_flop:>6.1%}"
                if peak_flop
                else "   n/a"
            )
            gib = (
                f"{run.peak_bytes / 2**30:>10.2f}" if run.peak_bytes is not None else f"{'n/a':>10}"
            )
            pred = f"{predicted / 2**30:>11.3f}" if predicted is not None else f"{'n/a':>11}"
            print(f"{variant:<16}{loop:<9}{run.seconds_per_step * 1e3:>9.1f}"
                  f"{run.tokens_per_second:>12,.0f} {mfu}{gib}{pred}", flush=True)  # fmt: skip
        if len(runs) == 2:
            ratio = runs["trainer"].seconds_per_step / runs["hand"].seconds_per_step
            print(f"{variant:<16}trainer / hand-written step time: {ratio:.3f} (goal <= 1.01)")
    if not args.smoke:
        print(torchtitan_row(args), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
