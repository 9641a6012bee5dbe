"""BaseTrainer: the life of a run (launch, configure, setup, fit, teardown) and the loop."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dream_trainer.configs import TrainerConfig
from dream_trainer.trainer.batches import agreed_batches, set_epoch
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
        self._epoch_batches = 0
        """Micro-batches of the current epoch run so far (per rank)."""
        self._epoch_samples = 0
        """Samples of the current epoch consumed so far, over all data-parallel ranks."""
        self._loader_skip = 0
        """Batches a resumed loader already skips (restored mid-epoch) but still counts in len."""
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

    def _model_of(self, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The model whose parameters ``optimizer`` holds (a ModuleDict when it spans several)."""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        owners = {
            name: model
            for name, model in self.named_models().items()
            if any(id(p) in held for p in model.parameters())
        }
        if len(owners) == 1:
            return next(iter(owners.values()))
        return nn.ModuleDict(owners)

    def named_dataloaders(self) -> dict[str, Any]:
        """The loaders in use, by role (``train``, ``val``)."""
        loaders = {"train": self.train_dataloader, "val": self.val_dataloader}
        return {role: loader for role, loader in loaders.items() if loader is not None}

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
            finished = self._train_epoch()
            self.callbacks.post_epoch()
            if training.val_every_n_steps is None and self.val_dataloader is not None:
                self.validate()
            if not finished:  # max_steps stopped it part way: a resumed run continues it
                break
            self.current_epoch += 1
            self._epoch_batches, self._epoch_samples = 0, 0

    def _reached_max_steps(self) -> bool:
        max_steps = self.config.training_parameters.max_steps
        return max_steps is not None and self.global_step >= max_steps

    def _train_epoch(self) -> bool:
        """Train until the epoch ends (True) or max_steps is reached part way (False)."""
        training = self.config.training_parameters
        accum = training.gradient_accumulation_steps
        loader = self.train_dataloader
        if loader is None:
            raise RuntimeError("no training dataloader: configure_dataloaders must return one")
        set_epoch(loader, self.current_epoch)
        # After a mid-epoch resume the epoch continues: fewer batches are left in it.
        done = self._epoch_batches
        limit = None  # the epoch's own end; max_steps stops the loop below
        if training.train_steps_per_epoch is not None:
            limit = training.train_steps_per_epoch * accum - done
        for model in self.named_models().values():
            model.train()
        running: dict[str, torch.Tensor] = {}
        progress: dict[str, int | None] = {}
        batches = agreed_batches(
            loader,
            limit,
            self.world,
            multiple_of=accum,
            what="training",
            skip=self._loader_skip,
            progress=progress,
        )
        self._loader_skip = 0
        ran = 0
        for batch_idx, batch in batches:
            ran += 1
            self._micro_batch_index = batch_idx % accum
            batch = move_to_device(batch, self.device)
            self._epoch_batches += 1
            self._epoch_samples += infer_batch_size(batch) * self.world.dp_size
            with self._context_batches.batch(batch, "training") as batch:
                self.callbacks.pre_train_step(batch, batch_idx)
                result = self.training_step(batch, batch_idx)
            if not isinstance(result, dict):
                raise TypeError(
                    f"training_step must return a dict of scalar metrics, got {type(result).__name__}"
                )
            completes_step = not self.is_accumulating_gradients
            if completes_step:
                if not self._stepped_this_group and self.named_optimizers():
                    raise RuntimeError(
                        "training_step did not call self.step(optimizer) on the last micro-batch "
                        f"of step {self.global_step} (is_accumulating_gradients was False)"
                    )
                self._end_accumulation_group()
                self.global_step += 1  # before post_train_step: it sees the completed count
            self.callbacks.post_train_step(result, batch_idx)
            for name, value in result.items():
                scalar = as_scalar_tensor(name, value, self.device)
                running[name] = running[name] + scalar if name in running else scalar
            if not completes_step:
                continue
            self._maybe_log_train_metrics(running, accum)
            running = {}
            every = training.val_every_n_steps
            if every and self.val_dataloader is not None and self.global_step % every == 0:
                self.validate()
            self.after_train_step()
            if self._reached_max_steps():
                break
        self._micro_batch_index = 0
        total = progress.get("total")
        return not self._reached_max_steps() or (total is not None and ran == total)

    def after_train_step(self) -> None:
        """Runs after each optimizer step's logging and validation (checkpointing hooks in here)."""

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
        return {
            "trainer": {
                "global_step": self.global_step,
                "current_epoch": self.current_epoch,
                "epoch_batches": self._epoch_batches,
                "epoch_samples": self._epoch_samples,
            },
            "callbacks": self.callbacks.state_dict(),
            "rng": self.rng_state(),
        }

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's RNG states: torch's, and the accelerator's on one."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type != "cpu":
            rng[self.device.type] = torch.get_device_module(self.device.type).get_rng_state()
        return rng

    def set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`rng_state` returned (states of other devices are ignored)."""
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if self.device.type != "cpu" and self.device.type in rng:
            torch.get_device_module(self.device.type).set_rng_state(rng[self.device.type])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = state_dict["trainer"]
        self.global_step = int(trainer["global_step"])
        self.current_epoch = int(trainer["current_epoch"])
        self._epoch_batches = int(trainer.get("epoch_batches", 0))
        self._epoch_samples = int(trainer.get("epoch_samples", 0))
        self.callbacks.load_state_dict(state_dict.get("callbacks", {}))
        self.set_rng_state(state_dict.get("rng", {}))
