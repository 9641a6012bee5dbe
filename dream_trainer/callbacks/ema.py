"""EMA: an exponential moving average of the model weights, sharded like the weights."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from dream_trainer.callbacks._common import check_int
from dream_trainer.parallel.materialize import canonical_name, local_piece
from dream_trainer.trainer import BaseTrainer, Callback


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself when it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class EMA(Callback[BaseTrainer]):
    """Keeps ``ema = decay * ema + (1 - decay) * weight`` of every trainable parameter.

    The averages have the parameters' placement and dtype: under FSDP or TP each rank keeps the
    average of its own shards (DTensors with the parameters' mesh and placements), and an
    update is a local ``lerp_`` with no communication. They start as a copy of the weights
    once the trainer is set up, and are updated after every ``every_n_steps``-th optimizer step
    that ran (a step skipped for a non-finite gradient norm does not count); with several
    optimizers, after each one's step for the parameters it holds.

    Args:
        decay: weight of the old average, in (0, 1), e.g. 0.999.
        every_n_steps: update after global steps that are multiples of this (the decay is
            applied as given on each update).
        warmup_steps: ramp the decay linearly from 0 to ``decay`` over the first
            ``warmup_steps`` steps: ``decay * min(1, step / warmup_steps)`` with ``step`` the
            1-based global step. 0 (the default) uses ``decay`` from the first update.
        validate_with_ema: run validation with the averages in the models, then put the
            training weights back (both in place).
        models: names of the models to average (default: every model of the trainer).

    Its ``state_dict()`` holds the averages as DTensors (plain weights are wrapped as
    replicated ones), so a checkpoint stores them with DCP beside the model and a resume under
    another layout reshards them.
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        every_n_steps: int = 1,
        warmup_steps: int = 0,
        validate_with_ema: bool = False,
        models: Sequence[str] | None = None,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(
                f"EMA(decay={decay!r}): decay must be a number strictly between 0 and 1 (the "
                "weight of the old average), e.g. 0.999; use warmup_steps for a smaller decay "
                "early on"
            )
        self.decay = float(decay)
        self.every_n_steps = check_int(
            "EMA", "every_n_steps", every_n_steps, 1, "give 1 to update after every step"
        )
        self.warmup_steps = check_int(
            "EMA", "warmup_steps", warmup_steps, 0, "give 0 for no warmup of the decay"
        )
        if isinstance(models, str):
            raise TypeError(
                f"EMA(models={models!r}): give a list of model names, e.g. [{models!r}]"
            )
        self.validate_with_ema = bool(validate_with_ema)
        self.model_names = None if models is None else list(models)
        self.updates = 0
        """How many times the averages were updated."""
        self._averages: dict[str, torch.Tensor] | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._keys_of: dict[int, list[str]] = {}
        self._loaded = False
        self._swapped = False
        self._swap_context: AbstractContextManager[None] | None = None

    # ------------------------------------------------------------------ the averages

    @property
    def averages(self) -> dict[str, torch.Tensor]:
        """``{"<model>.<parameter>": average}``, placed like the parameters (read-only use)."""
        return dict(self._ensure())

    def _ensure(self) -> dict[str, torch.Tensor]:
        if self._averages is not None:
            return self._averages
        models = self.trainer.named_models()
        names = list(models) if self.model_names is None else self.model_names
        unknown = [n for n in names if n not in models]
        if unknown or not names:
            raise ValueError(
                f"EMA(models={self.model_names!r}): the trainer has models {sorted(models)}; "
                + (f"{unknown} are not among them" if unknown else "there is nothing to average")
            )
        params: dict[str, nn.Parameter] = {}
        for name in names:
            for param_name, param in models[name].named_parameters():
                if param.is_meta:
                    raise RuntimeError(
                        "EMA needs the set-up models (their parameters are still on the meta "
                        "device); use it from post_setup on, e.g. load its state after setup"
                    )
                if param.requires_grad:
                    params[f"{name}.{canonical_name(param_name)}"] = param
        with torch.no_grad():
            # For a DTensor, clone keeps the mesh, placements and (uneven) shard sizes.
            self._averages = {key: p.detach().clone() for key, p in params.items()}
        self._params = params
        self._keys_of = {}
        return self._averages

    @torch.no_grad()
    def post_setup(self) -> None:
        # A resume in setup builds the averages (from the weights before loading) and fills
        # them from the checkpoint; one without EMA state leaves them: start from the weights.
        averages = self._ensure()
        if not self._loaded:
            for key, param in self._params.items():
                _local(averages[key]).copy_(_local(param))

    def decay_at(self, step: int) -> float:
        """The decay used by an update after the 1-based global step ``step``."""
        if self.warmup_steps:
            return self.decay * min(1.0, step / self.warmup_steps)
        return self.decay

    def _keys_held_by(self, optimizer: torch.optim.Optimizer) -> list[str]:
        if id(optimizer) not in self._keys_of:
            self._ensure()
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._keys_of[id(optimizer)] = [k for k, p in self._params.items() if id(p) in held]
        return self._keys_of[id(optimizer)]

    @torch.no_grad()
    def post_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.trainer.global_step + 1  # the step being completed, 1-based
        if step % self.every_n_steps:
            return
        if self._swapped:
            raise RuntimeError("EMA: an optimizer stepped while the averages were swapped in")
        keys, averages = self._keys_held_by(optimizer), self._ensure()
        if keys:
            torch._foreach_lerp_(
                [_local(averages[k]) for k in keys],
                [_local(self._params[k]) for k in keys],
                1.0 - self.decay_at(step),
            )
        self.updates += 1

    # ------------------------------------------------------------------ swapping

    def _reshard(self) -> None:
        # FSDP may keep gathered weights after a forward (e.g. reshard_after_forward=False);
        # drop them so the next forward gathers what the shards hold now.
        for parts in self.trainer.model_parts().values():
            for part in parts:
                for module in part.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()

    @torch.no_grad()
    def _exchange(self) -> None:
        averages = self._ensure()
        for key, param in self._params.items():
            mine, theirs = _local(param), _local(averages[key])
            held = mine.clone()
            mine.copy_(theirs)
            theirs.copy_(held)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the models hold the averages; the training weights come back after.

        Both copies are exchanged in place, shard by shard, without communication.
        """
        if self._swapped:
            raise RuntimeError("EMA.swapped(): the averages are already swapped in")
        self._reshard()
        self._exchange()
        self._swapped = True
        try:
            yield
        finally:
            self._reshard()
            self._exchange()
            self._swapped = False

    def pre_validation_epoch(self) -> None:
        if self.validate_with_ema:
            self._swap_context = self.swapped()
            self._swap_context.__enter__()

    def post_validation_epoch(self, results: dict[str, float]) -> None:
        context = self._swap_context
        if context is not None:
            self._swap_context = None
            context.__exit__(None, None, None)

    def full_averages(self) -> dict[str, torch.Tensor]:
        """Every average as a full tensor (a collective under FSDP/TP: call it on every rank)."""
        if self._swapped:
            raise RuntimeError("EMA.full_averages(): the averages are swapped into the models")
        return {
            k: v.full_tensor() if isinstance(v, DTensor) else v.clone()
            for k, v in self._ensure().items()
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        if self._swapped:
            raise RuntimeError(
                "EMA.state_dict(): the averages are swapped into the models (inside validation "
                "or EMA.swapped()); save after the block"
            )
        if self._averages is None and not self._set_up():
            return {"updates": self.updates}  # before setup there is nothing to average yet
        mesh = self._world_mesh()
        averages = {}
        for key, value in self._ensure().items():
            if mesh is not None and not isinstance(value, DTensor):
                # Replicated on every rank: as a DTensor it goes to DCP, not the JSON files.
                value = DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
            averages[key] = value
        return {"updates": self.updates, "averages": averages}

    def _set_up(self) -> bool:
        models = self.trainer.named_models()
        return bool(models) and not any(p.is_meta for m in models.values() for p in m.parameters())

    def _world_mesh(self) -> Any:
        try:
            return self.trainer.world.get_mesh("world")
        except RuntimeError:  # the world is not (or no longer) launched: keep plain tensors
            return None

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        saved = state_dict.get("averages")
        if saved is None:
            return
        averages = self._ensure()
        missing = sorted(set(averages) - set(saved))
        unexpected = sorted(set(saved) - set(averages))
        if missing or unexpected:
            raise RuntimeError(
                f"EMA state does not match the models: missing averages {missing[:5]}, "
                f"unexpected {unexpected[:5]}; load a checkpoint of the same models"
            )
        for key, target in averages.items():
            _copy_into(target, saved[key])
        self._loaded = True


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``target`` whatever their layouts (local when they match)."""
    if source is target:
        return
    if (
        isinstance(source, DTensor)
        and isinstance(target, DTensor)
        and source.device_mesh == target.device_mesh
        and source.placements == target.placements
    ):
        target.to_local().copy_(source.to_local())
        return
    full = source.full_tensor() if isinstance(source, DTensor) else source
    if isinstance(target, DTensor):
        target.to_local().copy_(local_piece(full, target))
    else:
        target.copy_(full.to(device=target.device, dtype=target.dtype))
