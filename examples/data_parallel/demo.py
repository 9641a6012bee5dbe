"""Data parallelism shown on a few ranks: split inference, gradient sync, a transformer.

    dream-trainer run --nproc 2 examples/data_parallel/demo.py [--force-cpu]
    torchrun --standalone --nproc_per_node=2 examples/data_parallel/demo.py [--force-cpu]

Every rank holds a full copy of each model. (a) ``distributed_map`` splits items over the
ranks and returns every result once, in input order. (b) Under torch's DDP each rank's own
gradient differs; the backward's all-reduce leaves the same averaged gradient on every rank,
so the weights stay identical. (c) A small transformer: continuations split over the ranks,
then a few ``DreamTrainer`` steps with ``DeviceParameters.DDP()``. Rank 0 prints what every
rank reports. On GPUs each process takes the GPU of its local rank; ``--force-cpu`` keeps it
on the CPU (gloo). The throughput comparison is ``throughput.py`` next to this file.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.data_parallel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, LoggingParameters, TrainingParameters
from dream_trainer.inference import distributed_map, even_split
from dream_trainer.world import DistributedWorld
from examples.data_parallel.models import MLP, TinyLM, greedy_continue

DEMOS = ("inference", "gradients", "transformer")


def pick_device(force_cpu: bool) -> torch.device:
    """The GPU of this process's local rank, or the CPU (``--force-cpu``, or no GPU)."""
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Report:
    """Rank 0 prints; ``each`` gathers one line from every rank and prints them in rank order."""

    def __init__(self, world: DistributedWorld) -> None:
        self.world = world

    def say(self, text: str) -> None:
        if self.world.is_global_zero:
            print(text, flush=True)

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(values, value, group=self.world.cpu_group)
        return values

    def each(self, line: str) -> None:
        for text in self.gather(line):
            self.say(text)


def describe(ids: Sequence[int]) -> str:
    """``0-16 (17 items)`` for a contiguous run, else the list."""
    if not ids:
        return "none (0 items)"
    if list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]} ({len(ids)} items)"
    return f"{list(ids)} ({len(ids)} items)"


def vector(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.4f}" for v in t.flatten().tolist()) + "]"


# ----------------------------------------------------------------------------- (a) inference


def demo_inference(world: DistributedWorld, report: Report, n_items: int) -> None:
    torch.manual_seed(0)  # the same seed on every rank: the same weights, a full copy each
    model = MLP().to(world.device).eval()
    g = torch.Generator().manual_seed(1)
    items = [{"id": i, "x": torch.randn(8, generator=g)} for i in range(n_items)]
    mine: list[int] = []

    def score(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with torch.no_grad():
            y = model(torch.stack([item["x"] for item in batch]).to(world.device))
        return [{"id": item["id"], "score": float(v)} for item, v in zip(batch, y)]

    def score_and_note(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mine.extend(item["id"] for item in batch)
        return score(batch)

    results = distributed_map(score_and_note, items, batch_size=4, world=world)
    shares = [len(part) for part in even_split(n_items, world.dp_size)]
    report.say(f"\n== (a) data-parallel inference: {n_items} items on {world.dp_size} ranks ==")
    report.say(f"split: {' + '.join(map(str, shares))} (contiguous shares, sizes differ by <= 1)")
    report.each(f"rank {world.rank} processed items {describe(mine)}")
    if results is None:  # gather="rank0": the other ranks get None
        return
    ids = [r["id"] for r in results]
    report.say(
        f"ordered result on rank 0: ids {describe(ids)}, in input order: {ids == sorted(ids)}"
    )
    report.say("first results: " + ", ".join(f"{r['id']}: {r['score']:+.4f}" for r in results[:4]))
    alone = score(items)  # one process doing everything, for comparison
    gap = max(abs(a["score"] - b["score"]) for a, b in zip(results, alone))
    report.say(f"equal to one process scoring every item: {gap < 1e-5} (max difference {gap:.1e})")


# ----------------------------------------------------------------------------- (b) gradients


def demo_gradients(world: DistributedWorld, report: Report) -> None:
    device = world.device
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + world.rank)  # each rank its own samples
    x = torch.randn(8, 4, generator=g).to(device)
    y = x.sum(-1, keepdim=True)

    with ddp.no_sync():  # backward without DDP's all-reduce: this rank's own gradient
        F.mse_loss(ddp(x), y).backward()
    assert model.weight.grad is not None
    local = model.weight.grad.detach().cpu().clone()
    optimizer.zero_grad()
    F.mse_loss(ddp(x), y).backward()  # DDP averages the gradients over the ranks in backward
    synced = model.weight.grad.detach().cpu().clone()
    optimizer.step()
    weights = model.weight.detach().cpu().clone()

    locals_, synceds, all_weights = zip(*report.gather((local, synced, weights)))
    report.say("\n== (b) training: each rank's gradient, then DDP's all-reduce ==")
    for rank, grad in enumerate(locals_):
        report.say(f"rank {rank}: local gradient  {vector(grad)}")
    if len(locals_) > 1:
        differ = any(not torch.equal(locals_[0], grad) for grad in locals_[1:])
        report.say(f"local gradients differ between ranks: {differ} (each saw its own 8 samples)")
    for rank, grad in enumerate(synceds):
        report.say(f"rank {rank}: after all-reduce {vector(grad)}")
    equal = all(torch.equal(synceds[0], grad) for grad in synceds)
    mean = torch.stack(list(locals_)).mean(0)
    averaged = all(torch.allclose(grad, mean, atol=1e-6) for grad in synceds)
    report.say(f"gradients equal on every rank after the all-reduce: {equal}")
    report.say(f"and equal to the mean of the local gradients: {averaged}")
    same = all(torch.equal(all_weights[0], w) for w in all_weights)
    report.say(f"weights equal on every rank after optimizer.step(): {same}")


# ----------------------------------------------------------------------------- (c) transformer

VOCAB, SEQ = 64, 16


class CountingData(Dataset[dict[str, torch.Tensor]]):
    """Sequences that count up modulo the vocabulary from a random start: easy to learn."""

    def __init__(self, n: int) -> None:
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(2))
        self.tokens = (starts + torch.arange(SEQ + 1)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), "tokens": self.tokens[i]}


class LMTrainer(DreamTrainer):
    """Next-token training of :class:`TinyLM`; notes what this rank saw at each step."""

    micro_batch = 4

    def configure_models(self) -> None:
        self.model = TinyLM(vocab=VOCAB)
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    def configure_dataloaders(self) -> tuple[DataLoader[Any], None]:
        data = CountingData(64)
        sampler = self.distributed_sampler(data)  # a disjoint part of the data per rank
        return DataLoader(data, batch_size=self.micro_batch, sampler=sampler), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        tokens = batch["tokens"]
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        self.backward(loss)
        self.step(self.optimizer)
        self.seen.append(batch["index"].tolist())
        self.losses.append(float(loss.detach()))
        return {"loss": loss.detach()}


def local_weights(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter flattened; a DTensor (the trainer's DDP) contributes its local copy."""
    parts = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return torch.cat([p.detach().flatten().cpu() for p in parts])


def demo_transformer(world: DistributedWorld, report: Report, steps: int) -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB).to(world.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (4 + i % 5,), generator=g).tolist() for i in range(12)]
    mine: list[int] = []
    index = {id(p): i for i, p in enumerate(prompts)}

    def continue_batch(batch: list[list[int]]) -> list[list[int]]:
        mine.extend(index[id(p)] for p in batch)
        return [greedy_continue(model, p, 4) for p in batch]

    # distributed_map passes this process's own prompt objects to fn: ids identify them
    results = distributed_map(continue_batch, prompts, batch_size=2, world=world)
    report.say(
        f"\n== (c) a small transformer ({n_params:,} parameters) on {world.dp_size} ranks =="
    )
    report.say("inference: 12 prompts of 4 to 8 tokens, 4 new tokens each (greedy)")
    report.each(f"rank {world.rank} continued prompts {describe(mine)}")
    if results is not None:
        alone = [greedy_continue(model, p, 4) for p in prompts]
        report.say(f"continuations equal to one process: {results == alone}")

    run_dir: list[Any] = [tempfile.mkdtemp(prefix="dp-demo-") if world.is_global_zero else None]
    dist.broadcast_object_list(run_dir, src=0, group=world.cpu_group)
    config = DreamTrainerConfig(
        project="data-parallel-demo",
        run_dir=run_dir[0],
        device_parameters=DeviceParameters.DDP(),
        training_parameters=TrainingParameters(n_epochs=1, max_steps=steps),
        logging_parameters=LoggingParameters(
            backends=[], log_every_n_steps=steps, progress_bar=False
        ),
    )
    trainer = LMTrainer(config, device=world.device)
    trainer.fit()
    per_step = LMTrainer.micro_batch * world.dp_size
    report.say(f"training: {steps} steps of DreamTrainer with DeviceParameters.DDP()")
    report.say(
        f"batch: {LMTrainer.micro_batch} per device x {world.dp_size} ranks = {per_step} samples "
        "per optimizer step"
    )
    first = trainer.seen[0]
    report.each(
        f"rank {world.rank}: step 1 on samples {first}, loss {trainer.losses[0]:.3f} -> "
        f"{trainer.losses[-1]:.3f} at step {steps}"
    )
    firsts = report.gather(set(first))
    disjoint = all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
    report.say(f"ranks trained on different samples: {disjoint}")
    all_weights = report.gather(local_weights(trainer.model))
    same = all(torch.equal(all_weights[0], w) for w in all_weights)
    report.say(f"weights identical on every rank after {steps} steps: {same}")
    if world.is_global_zero:
        shutil.rmtree(run_dir[0], ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    parser.add_argument("--demos", nargs="+", choices=DEMOS, default=list(DEMOS))
    parser.add_argument("--items", type=int, default=33, help="items of the inference demo")
    parser.add_argument("--steps", type=int, default=4, help="training steps of demo (c)")
    options = parser.parse_args(argv)
    if options.items < 0 or options.steps < 1:
        parser.error(f"--items must be >= 0 and --steps >= 1, got {options.items}, {options.steps}")
    if not logging.getLogger().handlers:  # show the library's INFO lines (on stderr)
        logging.basicConfig(format="[%(name)s] %(message)s")
        logging.getLogger("dream_trainer").setLevel(logging.INFO)
    world = DistributedWorld(DeviceParameters.DDP(), device=pick_device(options.force_cpu))
    with world:
        report = Report(world)
        backend = dist.get_backend()
        report.say(f"data parallelism on {world.world_size} rank(s), backend {backend}")
        report.each(f"rank {world.rank}: process {os.getpid()} on {world.device}")
        if world.world_size == 1:
            report.say(
                "one process: launch with `dream-trainer run --nproc 2 "
                "examples/data_parallel/demo.py` to see the ranks split the work"
            )
        if "inference" in options.demos:
            demo_inference(world, report, options.items)
        if "gradients" in options.demos:
            demo_gradients(world, report)
        if "transformer" in options.demos:
            demo_transformer(world, report, options.steps)
        report.say(
            "\n(d) throughput on 1, 2 and 4 ranks: python examples/data_parallel/throughput.py"
        )


if __name__ == "__main__":
    main()
