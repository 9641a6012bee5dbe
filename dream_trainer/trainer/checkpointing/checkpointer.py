"""Saving a trainer's state to a checkpoint directory and loading it back, under any layout.

What goes where (see :mod:`~dream_trainer.trainer.checkpointing.storage` for the directory):

* DCP (``*.distcp``, ``.metadata``): every model and optimizer state dict (sharded tensors keyed
  by parameter name, so another layout reshards them on load) and the tensor parts of callback
  state.
* ``trainer.json`` (rank 0): step, epoch, position in the epoch (batches per rank and samples
  over all data-parallel ranks), schedulers, the layout and the resolved config.
* ``rank_{r}.json`` (every rank): its RNG states, its dataloaders' states, the rest of the
  callbacks' state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from dream_trainer.trainer.checkpointing.optimizer_state import optimizer_state_dict
from dream_trainer.trainer.checkpointing.safe_io import (
    SafeLoadPlanner,
    SafeReader,
    read_json,
    write_json,
)
from dream_trainer.trainer.checkpointing.storage import commit, prune, step_dir

__all__ = ["Checkpointer", "KeyReport"]

logger = logging.getLogger("dream_trainer.checkpoint")

TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 1


def rank_file(rank: int) -> str:
    return f"rank_{rank}.json"


class KeyReport:
    """Model/optimizer keys a checkpoint lacks, and keys it has that nothing here takes."""

    def __init__(self, missing: list[str], unexpected: list[str]) -> None:
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected)

    def __str__(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:5]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
                )
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        return "; ".join(parts) or "all keys match"


def split_tensors(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """``value`` with its DTensors replaced by references; the DTensors go into ``out``."""
    if isinstance(value, DTensor):
        out[prefix] = value
        return {"__dcp__": prefix}
    if isinstance(value, dict):
        return {k: split_tensors(v, f"{prefix}.{k}", out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(value)]
    return value


def join_tensors(value: Any, loaded: dict[str, Any]) -> Any:
    """Undo :func:`split_tensors` with the loaded tensors."""
    if isinstance(value, dict):
        if set(value) == {"__dcp__"}:
            return loaded[value["__dcp__"]]
        return {k: join_tensors(v, loaded) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, loaded) for v in value]
    return value


class Checkpointer:
    """Writes and reads one trainer's checkpoints; async saves finish in the background.

    ``trainer`` is the :class:`~dream_trainer.trainer.CheckpointMixin` it serves; the group is
    a gloo group of its own, so background writes never share a group with training.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        world = trainer.world
        self.rank = world.rank
        # The world's current collective timeout (torch's default for a new group is 30 min).
        timeout = world.collective_timeout
        self.group = (
            dist.new_group(backend="gloo", timeout=timeout, group_desc="checkpointer")
            if world.world_size > 1
            else None
        )
        self._pending: list[tuple[Any, Callable[[], None] | None]] = []
        self._stager: Any = None
        self._stager_mode: str | None = None
        self._staging: Any = None
        self.last_save_time = time.monotonic()

    # ---------------------------------------------------------------------------- saving

    def save(self, root: Path, metrics: dict[str, float], async_mode: str) -> Path:
        """Write a checkpoint of the current step under ``root``; returns its final path."""
        self.wait()  # one save in flight at a time
        step = self.trainer.global_step
        partial, final = step_dir(root, step, partial=True), step_dir(root, step)
        partial.mkdir(parents=True, exist_ok=True)
        dcp_state, callback_json = self._dcp_state()
        write_json(partial / rank_file(self.rank), self._rank_state(callback_json))
        if self.rank == 0:
            write_json(partial / TRAINER_FILE, self._trainer_state())
        writer = dcp.FileSystemWriter(str(partial), sync_files=True)
        finish = self._committer_for(root, partial, final, step, metrics)
        if async_mode == "off":
            dcp.save(dcp_state, storage_writer=writer, process_group=self.group)
            self._barrier()
            if finish is not None:
                finish()
            self._barrier()  # every rank sees the committed checkpoint before going on
        else:
            kwargs = _async_kwargs(async_mode)
            stager = self._stager_for(async_mode)
            if stager is not None:
                kwargs["async_stager"] = stager
            response = dcp.async_save(
                dcp_state, storage_writer=writer, process_group=self.group, **kwargs
            )
            # With a background stager the copy of the state is still being made: the
            # parameters must not change until it is (see wait_for_staging).
            self._staging = getattr(response, "staging_completion", None)
            future = getattr(response, "upload_completion", response)
            self._pending.append((future, finish))
        self.last_save_time = time.monotonic()
        return final

    def _committer_for(
        self, root: Path, partial: Path, final: Path, step: int, metrics: dict[str, float]
    ) -> Callable[[], None] | None:
        if self.rank != 0:
            return None
        params = self.trainer.config.checkpoint_parameters

        def finish() -> None:
            commit(partial, final, step, metrics)
            prune(root, params.keep_last, params.keep_best, params.monitor, params.mode)
            logger.info("checkpoint of step %d written to %s", step, final)

        return finish

    def _stager_for(self, async_mode: str) -> Any:
        """One background stager per run, so its staging buffers are reused by every save.

        None where torch has no ``DefaultStager`` (then ``async_save`` copies the state on the
        calling thread before it returns, which is slower but equally safe).
        """
        if self._stager is not None and self._stager_mode == async_mode:
            return self._stager
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        except ImportError:  # pragma: no cover - torch without async staging
            return None
        self._close_stager()
        accelerator = torch.accelerator.is_available()
        options = StagingOptions(
            use_pinned_memory=accelerator,
            use_shared_memory=async_mode == "process",
            use_async_staging=True,
            use_non_blocking_copy=accelerator,
        )
        self._stager, self._stager_mode = DefaultStager(options), async_mode
        return self._stager

    def wait_for_staging(self) -> None:
        """Block until the last async save has its own copy of the state (call before the
        parameters or optimizer state change)."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def _close_stager(self) -> None:
        self.wait_for_staging()
        if self._stager is not None:
            self._stager.close()
        self._stager, self._stager_mode = None, None

    def poll(self) -> None:
        """Commit async saves that have finished writing (cheap; call after every step)."""
        while self._pending and self._pending[0][0].done():
            future, finish = self._pending.pop(0)
            future.result()
            if finish is not None:
                finish()

    def wait(self) -> None:
        """Block until every async save has been written and committed."""
        self.wait_for_staging()
        pending, self._pending = self._pending, []
        for future, finish in pending:
            future.result()
            if finish is not None:
                finish()

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _dcp_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        trainer = self.trainer
        state: dict[str, Any] = {
            "models": {n: get_model_state_dict(m) for n, m in trainer.named_models().items()},
            "optimizers": {
                name: optimizer_state_dict(trainer._model_of(opt), opt)
                for name, opt in trainer.named_optimizers().items()
            },
        }
        tensors: dict[str, torch.Tensor] = {}
        callbacks = split_tensors(trainer.callbacks.state_dict(), "callbacks", tensors)
        if tensors:
            state["callbacks"] = tensors
        return state, callbacks

    def _rank_state(self, callbacks: dict[str, Any]) -> dict[str, Any]:
        trainer = self.trainer
        loaders = {}
        for role, loader in trainer.named_dataloaders().items():
            if hasattr(loader, "state_dict"):
                loaders[role] = loader.state_dict()
        return {"rng": trainer.rng_state(), "dataloaders": loaders, "callbacks": callbacks}

    def layout(self) -> dict[str, Any]:
        """The parallel layout of this run, as recorded in a checkpoint."""
        world = self.trainer.world
        degrees = {d: world.size(d) for d in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}
        return {"world_size": world.world_size, "degrees": degrees, "dp_size": world.dp_size}

    def seconds_since_save(self) -> float:
        return time.monotonic() - self.last_save_time

    def _trainer_state(self) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "format": FORMAT_VERSION,
            "global_step": trainer.global_step,
            "current_epoch": trainer.current_epoch,
            "epoch_batches": trainer._epoch_batches,
            "epoch_samples": trainer._epoch_samples,
            "skipped_steps": trainer.skipped_steps,
            "schedulers": {n: s.state_dict() for n, s in trainer.named_schedulers().items()},
            # DCP stores a fresh optimizer as one zero-gradient step; resume must not keep that.
            "optimizers_stepped": {n: bool(o.state) for n, o in trainer.named_optimizers().items()},
            "layout": self.layout(),
            "config": trainer.config.model_dump(mode="json"),
            # LoggerMixin's wandb run, which a resumed training continues.
            "wandb_run_id": getattr(trainer, "wandb_run_id", None),
        }

    # --------------------------------------------------------------------------- loading

    def read_trainer_state(self, path: Path) -> dict[str, Any]:
        file = path / TRAINER_FILE
        if not file.is_file():
            raise RuntimeError(
                f"{path} is not a Dream Trainer checkpoint: it has no {TRAINER_FILE}"
            )
        return dict(read_json(file))

    def key_report(self, path: Path, template: dict[str, Any]) -> KeyReport:
        """Compare the checkpoint's model/optimizer keys with ``template``'s (all ranks')."""
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        metadata = SafeReader(str(path)).read_metadata()
        saved = {k for k in metadata.state_dict_metadata if k.split(".")[0] in template}
        flat, _ = flatten_state_dict(template)
        wanted = set(flat)
        everyone = [wanted]
        if self.group is not None:
            gathered: list[Any] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, wanted, group=self.group)
            everyone = gathered
        taken = set().union(*everyone)
        return KeyReport(sorted(wanted - saved), sorted(saved - taken))

    def load_dcp(self, path: Path, state: dict[str, Any], partial: bool) -> None:
        """Fill ``state`` (a template of the right shapes and layout) from the checkpoint."""
        try:
            dcp.load(
                state,
                storage_reader=SafeReader(str(path)),
                planner=SafeLoadPlanner(allow_partial_load=partial),
                process_group=self.group,
            )
        except CheckpointException as wrapped:
            # DCP wraps each rank's error in a BaseException that `except Exception` misses;
            # raise the first rank's own error (its message names the file and the fix).
            raise _first_failure(wrapped, path) from wrapped

    def close(self) -> None:
        self.wait()
        used_process = self._stager_mode == "process"
        self._close_stager()
        if used_process:
            _stop_saver_process()
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self.group = None


def _stop_saver_process() -> None:
    """End torch's background saver process, started by the first ``async_mode="process"``
    save: it joined this run's process group, so a later run must start its own, and left to
    interpreter exit it dies with a traceback when its pipe closes."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as executor
    except ImportError:  # pragma: no cover - torch without the process executor
        return
    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        process.__del__()  # what torch runs when it is collected: TERMINATE, then join


def _first_failure(wrapped: CheckpointException, path: Path) -> Exception:
    failures = wrapped.failures
    if not failures:
        return RuntimeError(f"loading the checkpoint {path} failed: {wrapped}")
    rank = min(failures)
    error = failures[rank][0]
    if isinstance(error, Exception):
        note = f"(checkpoint {path}; DCP reported failures on ranks {sorted(failures)})"
        error.add_note(note)
        return error
    return RuntimeError(f"loading the checkpoint {path} failed on rank {rank}: {error!r}")


def _async_kwargs(mode: str) -> dict[str, Any]:
    try:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    except ImportError as error:  # pragma: no cover - every supported torch has it
        raise RuntimeError(
            f"checkpoint_parameters.async_mode={mode!r} needs torch's async DCP checkpointer, "
            f"which torch {torch.__version__} lacks; set async_mode='off'"
        ) from error
    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    return {"async_checkpointer_type": kind}
