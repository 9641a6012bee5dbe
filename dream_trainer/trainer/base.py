"""BaseTrainer: the life of a run (launch, configure, setup, fit, teardown) and the loop."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dream_trainer.configs import BatchSizes, TrainerConfig
from dream_trainer.trainer.batches import agreed_batches, set_epoch
from dream_trainer.trainer.callback import Callback, CallbackCollection
from dream_trainer.trainer.console_logging import ensure_console_logging
from dream_trainer.trainer.context_batches import ContextParallelBatches
from dream_trainer.trainer.forward_backward import ForwardBackward
from dream_trainer.trainer.reduce import (
    StepResults,
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
from dream_trainer.trainer.throughput import RankWindow, StepClock
from dream_trainer.trainer.validation import Validation
from dream_trainer.world import DistributedWorld, ModelSize
from dream_trainer.world.process_groups import tag_compile_caches_with_groups
from dream_trainer.world.progress import Phase, Progress
from dream_trainer.world.watchdog import HangWatchdog

logger = logging.getLogger("dream_trainer.trainer")


class BaseTrainer(GradientStepping, ForwardBackward, Validation):
    """The loop and nothing else: no metrics library, no logger service.

    Subclasses (usually through the setup mixins) provide models, optimizers and dataloaders;
    users implement :meth:`training_step` and, with a validation loader, :meth:`validation_step`.
    """

    config: TrainerConfig
    serving_only: bool = False
    """Set up for inference only (``serving()``): no dataloaders, optimizers or metric sinks."""

    def __init__(
        self,
        config: TrainerConfig,
        callbacks: Iterable[Callback[Any]] = (),
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.world = DistributedWorld(
            config.device_parameters, device=device, model_size=self.measure_model_size
        )
        self.batch_sizes: BatchSizes | None = None
        """Per device, data-parallel ranks, accumulation and global, resolved at launch from
        ``training_parameters`` (see :meth:`resolve_batch_sizes`)."""
        self.callbacks = CallbackCollection(callbacks)
        self.callbacks.attach(self)
        self.global_step = 0
        self.current_epoch = 0
        self.train_dataloader: Iterable[Any] | None = None
        self.val_dataloader: Iterable[Any] | None = None
        self.validation_results: dict[str, float] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.run_id: str | None = None
        self.progress = Progress()
        """This rank's step and phase, read by the hang watchdog (see docs/hangs.md)."""
        self._watchdog: HangWatchdog | None = None
        self.stop_reason: str | None = None
        """Why :meth:`request_stop` ended the run early (``None``: it was not asked to)."""
        self._context_batches = ContextParallelBatches()  # replaced once the world launches
        self._epoch_batches = 0
        """Micro-batches of the current epoch run so far (per rank)."""
        self._epoch_samples = 0
        """Samples of the current epoch consumed so far, over all data-parallel ranks."""
        self._loader_skip = 0
        """Batches a resumed loader already skips (restored mid-epoch) but still counts in len."""
        self.step_clock = StepClock()
        """Times steps, loader waits and the log barrier (host clock only; see throughput.py)."""
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

    def tokens_in_batch(self, batch: Any) -> int | torch.Tensor | None:
        """Tokens in one training micro-batch, for the tokens/s and MFU metrics.

        Called on each micro-batch as the loader yields it (before it moves to the device).
        Return an int (e.g. ``batch["input_ids"].numel()``) or a 0-d tensor (e.g. the count of
        non-padding labels; read on the host once per log window, not per step). The default,
        ``None``, means batches have no token count: no token metrics are logged.
        """
        return None

    def resolve_batch_sizes(self, dp_size: int) -> BatchSizes:
        """The batch sizes on ``dp_size`` data-parallel ranks; default: from
        ``training_parameters`` (``micro_batch_size``, ``global_batch_size``, accumulation).
        Override to take the per-device size from a field of your own config."""
        return self.config.training_parameters.batch_sizes(dp_size)

    def measure_model_size(self) -> ModelSize:
        """The models' size, for an automatic layout without a given ``parameter_count``."""
        raise RuntimeError(
            f"{type(self).__name__} cannot count its models' parameters for the automatic layout "
            "(it has no configure_models); give them, e.g. "
            "DeviceParameters.auto(parameter_count=8_000_000_000)"
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

    def request_stop(self, reason: str) -> None:
        """End ``fit()`` normally after the current optimizer step, as if ``max_steps`` were reached.

        The loop finishes the step (logging, validation, periodic checkpoint), then stops; the
        end-of-fit checkpoint and ``post_fit`` still run. Every rank must call it at the same
        step (decide from values all ranks share, such as validation results), or ranks
        would wait for each other in the next collective.
        """
        self.stop_reason = reason

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
            self._apply_batch_sizes()
            self._open_run_directory()
            self.callbacks.post_launch()
            torch.manual_seed(self.config.seed)
            self.callbacks.pre_configure()
            self.configure()
            self.callbacks.post_configure()
            self.callbacks.pre_setup()
            self.setup()
            self.callbacks.post_setup()
            tag_compile_caches_with_groups()  # every group exists; nothing is compiled yet
            self.world.set_train_timeout()
            self.progress.mark(Phase.START, self.global_step)
            self._watchdog = HangWatchdog.for_world(
                self.world, self.progress, self.run_dir / "hang_reports"
            )
            if self._watchdog is not None:
                self._watchdog.start()
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
        except BaseException as error:
            if self._watchdog is not None:
                self._watchdog.report_failure(error)  # names the ranks that did not arrive
            self._teardown(abort=True)
            raise
        self._teardown(abort=False)

    def _apply_batch_sizes(self) -> None:
        sizes = self.batch_sizes = self.resolve_batch_sizes(self.world.dp_size)
        training = self.config.training_parameters
        if sizes.accumulation != training.gradient_accumulation_steps:
            # Derived from the global batch; the loop reads it from the config. A copy, so the
            # caller's config keeps what was given.
            derived = training.model_copy(
                update={"gradient_accumulation_steps": sizes.accumulation}
            )
            self.config = self.config.model_copy(update={"training_parameters": derived})
        if sizes.per_device is not None and self.world.is_global_zero:
            logger.info("%s", sizes.describe())

    def _teardown(self, abort: bool) -> None:
        watchdog, self._watchdog = self._watchdog, None
        try:
            if watchdog is not None:
                watchdog.stop(clean=not abort)
            self.teardown()
        finally:
            self.world.destroy(abort=abort)

    def _fit_loop(self) -> None:
        training = self.config.training_parameters
        while self.current_epoch < training.n_epochs and not self._should_stop():
            self.callbacks.pre_epoch()
            finished = self._train_epoch()
            self.callbacks.post_epoch()
            if training.val_every_n_steps is None and self.val_dataloader is not None:
                self.validate()
            if not finished:  # max_steps stopped it part way: a resumed run continues it
                break
            self.current_epoch += 1
            self._epoch_batches, self._epoch_samples = 0, 0
        self.check_gradient_norms()
        self.progress.mark(Phase.FINISH, self.global_step)
        if self.skipped_steps and self.world.is_global_zero:
            logger.warning(
                "skipped %d of %d optimizer steps (non-finite gradient norm)",
                self.skipped_steps,
                self.global_step,
            )

    def _reached_max_steps(self) -> bool:
        max_steps = self.config.training_parameters.max_steps
        return max_steps is not None and self.global_step >= max_steps

    def _should_stop(self) -> bool:
        return self.stop_reason is not None or self._reached_max_steps()

    def _train_epoch(self) -> bool:
        """Train until the epoch ends (True) or max_steps / a stop request ends it part way (False)."""
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
        results = StepResults()
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
        batches = self.step_clock.timed(batches, self.tokens_in_batch)
        batches = self.progress.each(batches, Phase.DATA)
        self._loader_skip = 0
        # Fixed for the epoch; read once, not per micro-batch.
        callbacks, context_batches = self.callbacks, self._context_batches
        device, dp_size = self.device, self.world.dp_size
        ran = 0
        for batch_idx, batch in batches:
            ran += 1
            self._micro_batch_index = batch_idx % accum
            batch = move_to_device(batch, device)
            self._epoch_batches += 1
            self._epoch_samples += infer_batch_size(batch) * dp_size
            self.progress.mark(Phase.FORWARD_BACKWARD, self.global_step)
            with context_batches.batch(batch, "training") as batch:
                callbacks.pre_train_step(batch, batch_idx)
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
            callbacks.post_train_step(result, batch_idx)
            results.add(result)
            if not completes_step:
                continue
            self.step_clock.step_done()
            self._maybe_log_train_metrics(results, accum)
            results.clear()
            every = training.val_every_n_steps
            if every and self.val_dataloader is not None and self.global_step % every == 0:
                self.validate()
            self.progress.mark(Phase.CHECKPOINT, self.global_step)
            self.after_train_step()
            if self._should_stop():
                break
        self._micro_batch_index = 0
        total = progress.get("total")
        return not self._should_stop() or (total is not None and ran == total)

    def after_train_step(self) -> None:
        """Runs after each optimizer step's logging and validation (checkpointing hooks in here)."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        with self.progress.during(Phase.OPTIMIZER):
            return super().step(optimizer)

    step.__doc__ = GradientStepping.step.__doc__

    def _maybe_log_train_metrics(self, results: StepResults, accum: int) -> None:
        every = self.log_every_n_steps
        if not every or self.global_step % every:
            return
        self.check_gradient_norms()  # the deferred check, before logging this window
        self.progress.mark(Phase.TRAIN_METRICS, self.global_step)
        self.step_clock.arrive()
        weight = torch.tensor(float(accum), device=self.device)
        mesh = self.world.get_mesh("dp_cp")
        self.last_train_metrics = weighted_mean_across(results.sums(self.device), weight, mesh)
        window = self.step_clock.take()  # the all-reduce above is the window's barrier
        metrics = {f"train/{k}": v for k, v in self.last_train_metrics.items()}
        if self.config.training_parameters.on_non_finite_grad == "skip":
            metrics["train/skipped_steps"] = float(self.skipped_steps)  # cumulative, resumes too
        metrics.update(self.train_window_metrics(window))
        self.log_dict(metrics, self.global_step)

    def train_window_metrics(self, window: RankWindow) -> dict[str, float]:
        """Extra metrics of a training log window (every rank calls it; LoggerMixin adds the
        throughput, MFU, memory and rank-balance metrics when enabled)."""
        return {}

    # State that must survive a restart

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": {
                "global_step": self.global_step,
                "current_epoch": self.current_epoch,
                "epoch_batches": self._epoch_batches,
                "epoch_samples": self._epoch_samples,
                "skipped_steps": self.skipped_steps,
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
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        self.callbacks.load_state_dict(state_dict.get("callbacks", {}))
        self.set_rng_state(state_dict.get("rng", {}))
