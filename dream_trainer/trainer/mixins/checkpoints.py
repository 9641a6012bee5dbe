"""CheckpointMixin: periodic, final and on-interrupt checkpoints, and resuming from them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dream_trainer.configs import CheckpointConfigMixin, TrainerConfig
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.checkpointing.checkpointer import (
    Checkpointer,
    join_tensors,
    rank_file,
    split_tensors,
)
from dream_trainer.trainer.checkpointing.safe_io import read_json
from dream_trainer.trainer.checkpointing.stop_flags import StopAndTimeFlags
from dream_trainer.trainer.checkpointing.storage import COMPLETE, complete_checkpoints
from dream_trainer.trainer.run_directory import experiment_dir
from dream_trainer.trainer.samplers import GlobalOrderSampler

logger = logging.getLogger("dream_trainer.checkpoint")


class _CheckpointConfig(CheckpointConfigMixin, TrainerConfig):
    pass


class CheckpointMixin(BaseTrainer):
    """Saves every ``every_n_steps`` / ``every_n_minutes``, at the end of ``fit`` and on SIGINT or
    SIGTERM (then stops), and resumes from the newest complete checkpoint (``resume="auto"``).

    Runs after every other mixin's ``setup``, so the models, optimizers and loaders it restores
    exist. Checkpoints live in ``{run_dir}/checkpoints``.
    """

    config: _CheckpointConfig  # type: ignore[assignment]
    wandb_run_id: str | None = None
    """Saved in ``trainer.json``; restored on resume so that LoggerMixin's wandb sink continues
    the same wandb run."""

    @property
    def checkpoint_dir(self) -> Path:
        """``{run_dir}/checkpoints`` of this run."""
        return self.run_dir / "checkpoints"

    # ---------------------------------------------------------------------- lifecycle

    def setup(self) -> None:
        super().setup()
        params = self.config.checkpoint_parameters
        self._checkpointer: Checkpointer | None = None
        self._last_saved_step: int | None = None
        if not (params.enable or params.init_from):
            return
        self._checkpointer = Checkpointer(self)
        if params.init_from:
            self.load_weights(params.init_from, strict=params.init_strict)
        if not params.enable or self.serving_only:  # inference loads weights only
            return
        source = self._resume_source(params.resume)
        if source is not None:
            self.load_checkpoint(source)
            self._last_saved_step = self.global_step
        # Not the checkpoint group: an async save's collectives run on it from another thread.
        flag_group = self.world.cpu_group if self.world.world_size > 1 else None
        self._flags = StopAndTimeFlags(flag_group)
        self._flags.install_signal_handlers()

    def after_train_step(self) -> None:
        super().after_train_step()
        if self._checkpointer is None or not self.config.checkpoint_parameters.enable:
            return
        params = self.config.checkpoint_parameters
        self._checkpointer.poll()
        minutes = params.every_n_minutes
        stop, timed = self._flags.agreed(self._checkpointer.seconds_since_save(), minutes)
        periodic = params.every_n_steps and self.global_step % params.every_n_steps == 0
        if stop or timed or periodic:
            self.save_checkpoint()
        if stop:
            raise KeyboardInterrupt(
                f"stopped by {self._flags.signal_name} after step {self.global_step}; its "
                f"checkpoint is in {self.checkpoint_dir}"
            )

    def _before_parameters_change(self) -> None:
        super()._before_parameters_change()
        checkpointer = getattr(self, "_checkpointer", None)
        if checkpointer is not None:
            checkpointer.wait_for_staging()

    def _fit_loop(self) -> None:
        super()._fit_loop()
        if self._checkpointer is not None and self.config.checkpoint_parameters.enable:
            if self._last_saved_step != self.global_step:
                self.save_checkpoint()
            self._checkpointer.wait()

    def teardown(self) -> None:
        try:
            flags = getattr(self, "_flags", None)
            if flags is not None:
                flags.close()
            if getattr(self, "_checkpointer", None) is not None:
                self._checkpointer.close()  # type: ignore[union-attr]
        finally:
            super().teardown()

    # ------------------------------------------------------------------------- saving

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (collective: every rank calls it)."""
        self.check_gradient_norms()  # never save weights a non-finite step has updated
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self)
        params = self.config.checkpoint_parameters
        path = self._checkpointer.save(self.checkpoint_dir, self._metrics(), params.async_mode)
        self._last_saved_step = self.global_step
        return path

    def _metrics(self) -> dict[str, float]:
        metrics = {f"train/{k}": v for k, v in self.last_train_metrics.items()}
        metrics.update(self.validation_results)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    # ------------------------------------------------------------------------ loading

    def _resume_source(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise FileNotFoundError(
                    f"checkpoint_parameters.resume={resume!r} is not a complete checkpoint (no "
                    f"{COMPLETE} in it); give a step_* directory of a run's checkpoints, 'auto' "
                    "or 'never'"
                )
            return path
        found: list[str | None] = [None]
        if self.world.is_global_zero:
            checkpoints = complete_checkpoints(experiment_dir(self.config))
            found = [str(checkpoints[-1].path) if checkpoints else None]
        if self.world.world_size > 1:
            dist.broadcast_object_list(found, src=0, group=self._checkpointer_group())
        return Path(found[0]) if found[0] is not None else None

    def _checkpointer_group(self) -> Any:
        assert self._checkpointer is not None
        return self._checkpointer.group

    def load_weights(self, path: str | Path, strict: bool = True) -> None:
        """Load only the models' weights from the checkpoint at ``path`` (collective).

        ``path`` may also be a ``.safetensors`` file, or a directory with ``model.safetensors``
        (or its sharded index), for a trainer with one model: every rank reads the whole file
        and keeps its own shards. Names go through ``self.convert_imported_weights(state)``
        first when the trainer defines it (e.g. to map another library's names to its own).
        """
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )
        from torch.distributed.tensor import DTensor

        from dream_trainer.parallel.materialize import canonical_name, local_piece
        from dream_trainer.trainer.checkpointing.checkpointer import KeyReport
        from dream_trainer.trainer.checkpointing.export import load_safetensors, safetensors_files

        assert self._checkpointer is not None
        path = Path(path)
        files = safetensors_files(path)
        if files is not None:
            models = self.named_models()
            if len(models) != 1:
                raise ValueError(
                    f"init_from={str(path)!r} is a safetensors file, which holds one model's "
                    f"weights, but {type(self).__name__} has {len(models)} models "
                    f"({', '.join(models)}); use a checkpoint directory instead"
                )
            (model,) = models.values()
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_safetensors(file))
            convert = getattr(self, "convert_imported_weights", None)
            if convert is not None:
                state = dict(convert(state))
            # Every name of each tensor (tied weights have several); one in the file is enough.
            names: dict[int, list[str]] = {}
            tensors: dict[int, torch.Tensor] = {}
            for name, tensor in model.state_dict(keep_vars=True).items():
                names.setdefault(id(tensor), []).append(canonical_name(name))
                tensors[id(tensor)] = tensor
            sources = {i: next((state[k] for k in n if k in state), None) for i, n in names.items()}
            mine = (
                {k for n in names.values() for k in n},
                [n[0] for i, n in names.items() if sources[i] is None],
                [
                    f"{n[0]} {tuple(s.shape)} (the model's is {tuple(tensors[i].shape)})"
                    for i, n in names.items()
                    if (s := sources[i]) is not None and s.shape != tensors[i].shape
                ],
            )
            everyone: list[Any] = [mine]
            if self._checkpointer.group is not None:  # every rank raises alike
                everyone = [None] * dist.get_world_size(self._checkpointer.group)
                dist.all_gather_object(everyone, mine, group=self._checkpointer.group)
            taken = set().union(*(e[0] for e in everyone))
            report = KeyReport(
                sorted({k for e in everyone for k in e[1]}), sorted(set(state) - taken)
            )
            wrong = sorted({k for e in everyone for k in e[2]})
            if wrong:
                raise ValueError(f"{path} has tensors of other shapes than the model's: {wrong}")
            if report and strict:
                raise RuntimeError(
                    f"the weights in {path} do not match {type(self).__name__}'s model: "
                    f"{report}. Fix the names (convert_imported_weights) or set "
                    "init_strict=false to load the names that match and keep the rest as "
                    "initialized"
                )
            if report and self.world.is_global_zero:
                logger.warning("loading %s non-strictly: %s", path, report)
            with torch.no_grad():
                for i, target in tensors.items():
                    if (source := sources[i]) is None:
                        continue
                    if isinstance(target, DTensor):
                        target.to_local().copy_(local_piece(source, target))
                    else:
                        target.copy_(source.to(device=target.device, dtype=target.dtype))
            logger.info("models initialized from %s", path)
            return
        template = {"models": {n: get_model_state_dict(m) for n, m in self.named_models().items()}}
        self._load_into(path, template, strict, what="init_from")
        for name, model in self.named_models().items():
            set_model_state_dict(model, template["models"][name])
        logger.info("models initialized from %s", path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the run saved at ``path``: models, optimizers, schedulers, counters, callbacks,
        RNG and the data position (collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self._checkpointer is not None
        path = Path(path)
        strict = self.config.checkpoint_parameters.strict
        saved = self._checkpointer.read_trainer_state(path)
        mine = self._rank_state(path)
        models = self.named_models()
        template: dict[str, Any] = {
            "models": {n: get_model_state_dict(m) for n, m in models.items()},
            "optimizers": {
                n: get_optimizer_state_dict(self._model_of(o), o)
                for n, o in self.named_optimizers().items()
            },
        }
        tensors: dict[str, torch.Tensor] = {}
        callbacks = split_tensors(self.callbacks.state_dict(), "callbacks", tensors)
        if tensors:
            template["callbacks"] = tensors
        self._load_into(path, template, strict, what="resume")
        for name, model in models.items():
            set_model_state_dict(model, template["models"][name])
        stepped = saved.get("optimizers_stepped", {})
        for name, optimizer in self.named_optimizers().items():
            set_optimizer_state_dict(
                self._model_of(optimizer), optimizer, template["optimizers"][name]
            )
            if stepped.get(name) is False:  # saved before its first step: keep it fresh
                optimizer.state.clear()
        for name, scheduler in self.named_schedulers().items():
            if name in saved["schedulers"]:
                scheduler.load_state_dict(saved["schedulers"][name])
        self.global_step = int(saved["global_step"])
        self.current_epoch = int(saved["current_epoch"])
        self._epoch_batches = int(saved["epoch_batches"])
        self._epoch_samples = int(saved["epoch_samples"])
        self.skipped_steps = int(saved.get("skipped_steps", 0))  # absent before it was saved
        state_callbacks = mine.get("callbacks", callbacks) if mine else callbacks
        self.callbacks.load_state_dict(join_tensors(state_callbacks, template.get("callbacks", {})))
        if mine:
            self.set_rng_state(mine["rng"])
        self._restore_data_position(path, saved, mine)
        if saved.get("wandb_run_id"):  # continue the saved run's wandb run (LoggerMixin)
            self.wandb_run_id = str(saved["wandb_run_id"])
        if self.world.is_global_zero:
            logger.info(
                "resumed from %s at step %d (epoch %d, %d samples into it)",
                path,
                self.global_step,
                self.current_epoch,
                self._epoch_samples,
            )

    def _rank_state(self, path: Path) -> dict[str, Any] | None:
        """This rank's ``rank_{r}.json`` (``None`` if the saving run had fewer ranks).

        A file one rank cannot read fails every rank, so none is left waiting for it.
        """
        file = path / rank_file(self.world.rank)
        state: dict[str, Any] | None = None
        error = ""
        try:
            state = dict(read_json(file)) if file.is_file() else None
        except RuntimeError as failure:
            error = f"rank {self.world.rank}: {failure}"
        errors = [error]
        group = self._checkpointer_group()
        if group is not None:
            errors = [""] * dist.get_world_size(group)
            dist.all_gather_object(errors, error, group=group)
        failures = [e for e in errors if e]
        if failures:
            raise RuntimeError("; ".join(failures))
        return state

    def _load_into(self, path: Path, template: dict[str, Any], strict: bool, what: str) -> None:
        assert self._checkpointer is not None
        report = self._checkpointer.key_report(path, template)
        if report and strict:
            option = "checkpoint_parameters.strict" if what == "resume" else "init_strict"
            raise RuntimeError(
                f"the checkpoint {path} does not match this trainer's models and optimizers: "
                f"{report}. Fix the model or the checkpoint, or set {option}=false to load the "
                "keys that match and keep the rest as initialized"
            )
        if report and self.world.is_global_zero:
            logger.warning("loading %s non-strictly: %s", path, report)
        if report.missing:
            _drop_keys(template, report.missing)
        self._checkpointer.load_dcp(path, template, partial=bool(report))

    def _restore_data_position(
        self, path: Path, saved: dict[str, Any], mine: dict[str, Any] | None
    ) -> None:
        loader = self.train_dataloader
        if loader is None or (self._epoch_batches == 0 and self._epoch_samples == 0):
            return
        sampler = _global_order_sampler(loader)
        if sampler is not None:
            sampler.resume_at(self.current_epoch, self._epoch_samples)
            return
        same_layout = saved["layout"] == self._checkpointer_layout()
        state = (mine or {}).get("dataloaders", {}).get("train")
        if same_layout and state is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state)
            self._loader_skip = self._epoch_batches  # len(loader) still counts them
            return
        if same_layout:
            where = (
                f"under this run's layout {saved['layout']}, but the training loader "
                f"({type(loader).__name__}) has no saved state to continue from (no state_dict/"
                "load_state_dict, e.g. a plain DataLoader)"
            )
        else:
            where = (
                f"under layout {saved['layout']}, and this run's layout is "
                f"{self._checkpointer_layout()}; the training loader ({type(loader).__name__}) "
                "cannot continue that epoch's sample order under another layout"
            )
        why = (
            f"the checkpoint {path} was saved mid-epoch {where}. Use "
            "self.distributed_sampler(dataset) (a GlobalOrderSampler, which follows a change of "
            "data-parallel degree), keep the layout, or set "
            "checkpoint_parameters.allow_data_order_restart=true to restart the epoch's order"
        )
        if not self.config.checkpoint_parameters.allow_data_order_restart:
            raise RuntimeError(why)
        if self.world.is_global_zero:
            logger.warning("restarting the data order of epoch %d: %s", self.current_epoch, why)
        self._epoch_batches, self._epoch_samples = 0, 0

    def _checkpointer_layout(self) -> dict[str, Any]:
        assert self._checkpointer is not None
        return self._checkpointer.layout()


def _global_order_sampler(loader: Any) -> GlobalOrderSampler | None:
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        if isinstance(sampler, GlobalOrderSampler):
            return sampler
    return None


def _drop_keys(template: dict[str, Any], dotted: list[str]) -> None:
    for key in dotted:
        *parents, leaf = key.split(".")
        node: Any = template
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(leaf, None)
