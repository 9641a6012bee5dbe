"""Do 2-rank FSDP runs exit cleanly? Launch a tiny training job under torchrun N times and count.

Usage:

* ``python benchmarks/clean_exit.py --runs 50`` launches ``torchrun --standalone
  --nproc_per_node=2`` on this script 50 times and counts exits by return code and by whether
  stderr contains ``terminate called`` (the C++ abort after ``fit()`` returned: reported for ~1
  run in 3-6 on a busy machine, 2 in 75 measured on the 2-core development machine).
* ``--worker`` (what torchrun runs): one rank of a tiny FSDP ``DreamTrainer`` training for
  ``--steps`` steps, console and JSONL logging into ``--run-dir``. ``--step-sleep`` stretches each
  step (a long run for tests that kill the launcher); ``--marker-dir`` gets a file
  ``started-<rank>-<pid>`` once the first step is done.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.trainer import Callback

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB, DIM, SEQ = 32, 16, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class Tiny(nn.Module):
    """Embedding, two residual blocks (FSDP's units), output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(x)

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


class Tokens(Dataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.rows = torch.randint(
            0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0)
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class ExitConfig(DreamTrainerConfig):
    step_sleep: float = 0.0


class ExitTrainer(DreamTrainer):
    config: ExitConfig

    def configure_models(self) -> None:
        self.model = Tiny()

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        steps = self.config.training_parameters.max_steps or 1
        data = Tokens(2 * steps * self.world.dp_size)
        return DataLoader(data, batch_size=2, sampler=self.distributed_sampler(data)), None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        self.backward(loss)
        self.step(self.optimizer)
        if self.config.step_sleep:
            time.sleep(self.config.step_sleep)
        return {"loss": loss}


class Marker(Callback[DreamTrainer]):
    """Writes ``started-<rank>-<pid>`` into a directory after the first training step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written = False

    def post_train_step(self, result: dict[str, Any], batch_idx: int) -> None:
        if not self.written:
            rank = self.trainer.world.rank
            (self.directory / f"started-{rank}-{os.getpid()}").touch()
            self.written = True


def worker(args: argparse.Namespace) -> None:
    config = ExitConfig(
        run_dir=args.run_dir,
        step_sleep=args.step_sleep,
        device_parameters=DeviceParameters.FSDP(),
        training_parameters=TrainingParameters(max_steps=args.steps),
        logging_parameters=LoggingParameters(log_every_n_steps=2),
    )
    callbacks = [Marker(Path(args.marker_dir))] if args.marker_dir else []
    ExitTrainer(config, callbacks=callbacks).fit()
    print(f"rank {os.environ.get('RANK', 0)} fit returned", flush=True)


def launch_once(steps: int, timeout: float) -> tuple[int, str]:
    """One ``torchrun --standalone --nproc_per_node=2`` run of the worker: (rc, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="clean-exit-") as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node=2", __file__, "--worker", "--steps", str(steps)]
        cmd += ["--run-dir", run_dir]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            err = expired.stderr or b""
            return -1, err.decode(errors="replace") if isinstance(err, bytes) else err
        return done.returncode, done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="torchrun launches to count")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per launch")
    parser.add_argument("--stop-on-abort", action="store_true", help="print its stderr and stop")
    parser.add_argument("--keep", type=Path, default=None, help="save failed runs' stderr here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="runs", help=argparse.SUPPRESS)
    parser.add_argument("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--marker-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    codes: collections.Counter[int] = collections.Counter()
    aborts = 0
    start = time.monotonic()
    for run in range(1, args.runs + 1):
        rc, err = launch_once(args.steps, args.timeout)
        codes[rc] += 1
        aborted = "terminate called" in err
        aborts += aborted
        print(f"run {run:3d}: rc={rc}{'  terminate called' if aborted else ''}", flush=True)
        if (aborted or rc != 0) and args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            (args.keep / f"run{run}.stderr").write_text(err)
        if (aborted or rc != 0) and args.stop_on_abort:
            print(err[-6000:])
            break
    ran = sum(codes.values())
    print(
        f"{ran} runs in {time.monotonic() - start:.0f} s: rc==0 {codes[0]}, "
        f"aborts ('terminate called') {aborts}, return codes {dict(sorted(codes.items()))}"
    )
    return 0 if codes[0] == ran else 1


if __name__ == "__main__":
    sys.exit(main())
