"""BaseTrainer: the life of a run (launch, configure, setup, fit, teardown) and the loop."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dream_trainer.configs import TrainerConfig
from dream_trainer.trainer.callback import Callback, CallbackCollection
from dream_trainer.trainer.console_logging import ensure_console_logging
from dream_trainer.trainer.context_batches import ContextParallelBatches
from dream_trainer.trainer.forward_backward import ForwardBackward
from dream_trainer.trainer.reduce import (
    as_scalar_tensor,
    infer_batch_size,
    move_to_device,
    weighted_mean_across,
)
from dream_trainer.trainer.run_directory import (
    agree_on_run_id,
    create_run_directory,
    experiment_dir,
)
from dream_trainer.trainer.stepping import GradientStepping
from dream_trainer.world import DistributedWorld

logger = logging.getLogger("dream_trainer.trainer")


class BaseTrainer(GradientStepping, ForwardBackward):
    """The loop and nothing else: no metrics library, no logger service.

    Subclasses (usually through the setup mixins) provide models, optimizers and dataloaders;
    users implement :meth:`training_step` and, with a validation loader, :meth:`validation_step`.
    """

    config: TrainerConfig

    def __init__(
        self,
        config: TrainerConfig,
        callbacks: Iterable[Callback[Any]] = (),
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.world = DistributedWorld(config.device_parameters, device=device)
        self.callbacks = CallbackCollection(callbacks)
        self.callbacks.attach(self)
        self.global_step = 0
        self.current_epoch = 0
        self.train_dataloader: Iterable[Any] | None = None
        self.val_dataloader: Iterable[Any] | None = None
        self.validation_results: dict[str, float] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.run_id: str | None = None
        self._context_batches = ContextParallelBatches()  # replaced once the world launches
        self._init_stepping()

    # Hooks for users

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Compute the loss, call ``self.backward`` and (when not accumulating) ``self.step``."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Return scalar metrics for one validation batch."""
        raise NotImplementedError(
            f"{type(self).__name__} has a validation dataloader but no validation_step"
        )

    # Hooks for mixins (cooperative: call super() first)

    def configure(self) -> None:
        """Declare models (on the meta device) and other objects; no memory is allocated."""

    def setup(self) -> None:
        """Parallelize, materialize and initialize models; build optimizers and data."""

    def teardown(self) -> None:
        """Release what setup acquired (loggers, files)."""

    def named_models(self) -> dict[str, nn.Module]:
        return {}

    def model_parts(self) -> dict[str, list[nn.Module]]:
        """Each model as the parts this rank runs (several under pipeline parallelism)."""
        return {name: [model] for name, model in self.named_models().items()}

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def named_schedulers(self) -> dict[str, Any]:
        return {}

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        """Send reduced metrics somewhere; the base trainer keeps them only in memory."""

    def collect_validation_metrics(self) -> dict[str, float]:
        """Extra metrics computed at the end of validation (e.g. torchmetrics)."""
        return {}

    @property
    def log_every_n_steps(self) -> int | None:
        """Reduce training metrics across ranks every N steps (``None``: never)."""
        return None

    # Facts

    @property
    def device(self) -> torch.device:
        if not hasattr(self.world, "device"):
            raise RuntimeError(
                "the trainer's world is not launched yet (fit() launches it); load state from a "
                "callback's post_setup hook or after world.launch()"
            )
        return self.world.device

    @property
    def run_dir(self) -> Path:
        """``{run_dir}/{project}/{experiment}/{run_id}``: this run's files (config, metrics)."""
        if self.run_id is None:
            raise RuntimeError(
                "the run directory is chosen when fit() launches the world; read run_dir from "
                "post_launch or later"
            )
        return experiment_dir(self.config) / self.run_id

    # Life of a run

    def _open_run_directory(self) -> None:
        self.run_id = agree_on_run_id(self.config, self.world.cpu_group)
        if self.world.is_global_zero:
            create_run_directory(self.config, self.run_id)
            logger.info("run directory %s", self.run_dir)

    def fit(self) -> None:
        """Launch, configure, set up, train (with validation), and tear down."""
        try:
            ensure_console_logging()
            self.callbacks.pre_launch()
            self.world.launch()
            self._context_batches = ContextParallelBatches(self.world)
            self._open_run_directory()
            self.callbacks.post_launch()
            torch.manual_seed(self.config.seed)
            self.callbacks.pre_configure()
            self.configure()
            self.callbacks.post_configure()
            self.callbacks.pre_setup()
            self.setup()
            self.callbacks.post_setup()
            self.world.set_train_timeout()
            self.callbacks.pre_fit()
            sanity = self.config.training_parameters.num_sanity_val_steps
            if sanity and self.val_dataloader is not None:
                self.validate(max_batches=sanity, log=False)
            self._fit_loop()
            self.callbacks.post_fit()
        except KeyboardInterrupt:
            self.callbacks.on_interrupt()
            self._teardown(abort=True)
            raise
        except BaseException:
            self._teardown(abort=True)
            raise
        self._teardown(abort=False)

    def _teardown(self, abort: bool) -> None:
        try:
            self.teardown()
        finally:
            self.world.destroy(abort=abort)

    def _fit_loop(self) -> None:
        training = self.config.training_parameters
        while self.current_epoch < training.n_epochs and not self._reached_max_steps():
            self.callbacks.pre_epoch()
            self._train_epoch()
            self.callbacks.post_epoch()
            if training.val_every_n_steps is None and self.val_dataloader is not None:
                self.validate()
            self.current_epoch += 1

    def _reached_max_steps(self) -> bool:
        max_steps = self.config.training_parameters.max_steps
        return max_steps is not None and self.global_step >= max_steps

    def _train_epoch(self) -> None:
        training = self.config.training_parameters
        accum = training.gradient_accumulation_steps
        loader = self.train_dataloader
        if loader is None:
            raise RuntimeError("no training dataloader: configure_dataloaders must return one")
        set_epoch(loader, self.current_epoch)
        limit = None
        if training.train_steps_per_epoch is not None:
            limit = training.train_steps_per_epoch * accum
        if training.max_steps is not None:
            remaining = (training.max_steps - self.global_step) * accum
            limit = remaining if limit is None else min(limit, remaining)
        for model in self.named_models().values():
            model.train()
        running: dict[str, torch.Tensor] = {}
        batches = agreed_batches(loader, limit, self.world, multiple_of=accum, what="training")
        for batch_idx, batch in batches:
            self._micro_batch_index = batch_idx % accum
            batch = move_to_device(batch, self.device)
            with self._context_batches.batch(batch, "training") as batch:
                self.callbacks.pre_train_step(batch, batch_idx)
                result = self.training_step(batch, batch_idx)
            if not isinstance(result, dict):
                raise TypeError(
                    f"training_step must return a dict of scalar metrics, got {type(result).__name__}"
                )
            self.callbacks.post_train_step(result, batch_idx)
            for name, value in result.items():
                scalar = as_scalar_tensor(name, value, self.device)
                running[name] = running[name] + scalar if name in running else scalar
            if self.is_accumulating_gradients:
                continue
            if not self._stepped_this_group and self.named_optimizers():
                raise RuntimeError(
                    "training_step did not call self.step(optimizer) on the last micro-batch of "
                    f"step {self.global_step} (is_accumulating_gradients was False)"
                )
            self._end_accumulation_group()
            self.global_step += 1
            self._maybe_log_train_metrics(running, accum)
            running = {}
            every = training.val_every_n_steps
            if every and self.val_dataloader is not None and self.global_step % every == 0:
                self.validate()
            if self._reached_max_steps():
                break
        self._micro_batch_index = 0

    def _maybe_log_train_metrics(self, running: dict[str, torch.Tensor], accum: int) -> None:
        every = self.log_every_n_steps
        if not every or self.global_step % every:
            return
        weight = torch.tensor(float(accum), device=self.device)
        mesh = self.world.get_mesh("dp_cp")
        self.last_train_metrics = weighted_mean_across(running, weight, mesh)
        metrics = {f"train/{k}": v for k, v in self.last_train_metrics.items()}
        self.log_dict(metrics, self.global_step)

    @torch.no_grad()
    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        """Run validation; metrics are averaged over data-parallel ranks, weighted by samples."""
        loader = self.val_dataloader
        if loader is None:
            return {}
        training = self.config.training_parameters
        limit = training.val_steps_per_epoch if max_batches is None else max_batches
        models = self.named_models().values()
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        self.callbacks.pre_validation_epoch()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        for batch_idx, batch in agreed_batches(loader, limit, self.world, 1, "validation"):
            batch = move_to_device(batch, self.device)
            with self._context_batches.batch(batch, "validation") as batch:
                self.callbacks.pre_validation_step(batch, batch_idx)
                result = self.validation_step(batch, batch_idx)
            self.callbacks.post_validation_step(result, batch_idx)
            n = infer_batch_size(batch)
            for name, value in result.items():
                scalar = as_scalar_tensor(name, value, self.device) * n
                sums[name] = sums[name] + scalar if name in sums else scalar
            count += n
        results = weighted_mean_across(sums, count, self.world.get_mesh("dp_cp"))
        results.update(self.collect_validation_metrics())
        for model, mode in zip(models, modes):
            model.train(mode)
        self.validation_results = results
        self.callbacks.post_validation_epoch(results)
        if log and results:
            self.log_dict(results, self.global_step)
        return results

    # State that must survive a restart

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type != "cpu":
            rng[self.device.type] = torch.get_device_module(self.device.type).get_rng_state()
        return {
            "trainer": {"global_step": self.global_step, "current_epoch": self.current_epoch},
            "callbacks": self.callbacks.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.global_step = int(state_dict["trainer"]["global_step"])
        self.current_epoch = int(state_dict["trainer"]["current_epoch"])
        self.callbacks.load_state_dict(state_dict.get("callbacks", {}))
        rng = state_dict.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if self.device.type in rng:
            torch.get_device_module(self.device.type).set_rng_state(rng[self.device.type])


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's sampler (or batch sampler) which epoch starts, for reshuffling."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def agreed_batches(
    loader: Iterable[Any],
    limit: int | None,
    world: DistributedWorld,
    multiple_of: int,
    what: str,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, batch)`` for a count every rank agrees on, so none waits in a collective.

    The count is a multiple of ``multiple_of`` (whole accumulation groups only). With
    ``len(loader)`` the ranks agree once on the smallest length; otherwise they read one group
    at a time and agree that every rank has a whole group before yielding it.
    """
    group = world.cpu_group if world.world_size > 1 else None
    try:
        local = len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # e.g. a DataLoader over an IterableDataset
        local = None
    if local is not None:
        if limit is not None:
            local = min(local, limit)
        lengths = [local]
        if group is not None:
            gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(world.world_size)]
            dist.all_gather(gathered, torch.tensor([local]), group=group)
            lengths = [int(t.item()) for t in gathered]
        smallest = min(lengths)
        total = smallest // multiple_of * multiple_of
        if total == 0 and local > 0 and what == "training":
            raise RuntimeError(
                f"the {what} dataloader yields {smallest} batches on the smallest "
                f"rank, fewer than gradient_accumulation_steps={multiple_of}; make batches "
                "smaller or lower gradient_accumulation_steps"
            )
        _warn_about_uneven_shares(what, lengths, total, world.rank)
        iterator = iter(loader)
        for index in range(total):
            yield index, next(iterator)
        return
    iterator = iter(loader)
    index = 0
    while limit is None or index + multiple_of <= limit:
        pending = []
        for _ in range(multiple_of):
            batch = next(iterator, _END)
            if batch is _END:
                break
            pending.append(batch)
        flag = torch.tensor([1 if len(pending) == multiple_of else 0])
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            if pending:
                logger.warning(
                    "the %s dataloader ran out inside an accumulation group; dropping %d "
                    "micro-batches so no partial group reaches the optimizer",
                    what,
                    len(pending),
                )
            return
        for batch in pending:
            yield index, batch
            index += 1


_END = object()


def _warn_about_uneven_shares(what: str, lengths: list[int], used: int, rank: int) -> None:
    """Say (once, from rank 0) when ranks have no batches or some drop batches to stay in step."""
    if rank != 0:
        return
    empty = [r for r, n in enumerate(lengths) if n == 0]
    if empty:
        logger.warning(
            "the %s dataloader yields 0 batches on rank(s) %s (batches per rank: %s), so %s "
            "runs no steps; give every data-parallel rank at least one batch (a larger dataset, "
            "smaller batches or fewer ranks)",
            what,
            empty,
            lengths,
            what,
        )
    elif min(lengths) == max(lengths) > used:
        logger.warning(
            "the %s dataloader yields %d batches per rank; the last %d do not fill a whole "
            "accumulation group and are skipped this pass",
            what,
            lengths[0],
            lengths[0] - used,
        )
    elif max(lengths) > used:
        dropped = {r: n - used for r, n in enumerate(lengths) if n > used}
        logger.warning(
            "the %s dataloader yields different numbers of batches per rank (%s); every rank "
            "runs %d so none waits in a collective, dropping %s batches (rank: count) this pass",
            what,
            lengths,
            used,
            dropped,
        )
