"""backward() and step(): gradient accumulation, sync suppression, norm, clipping, optimizer step."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dream_trainer.parallel.grad_norm import clip_grads_and_norm_, scale_grads_

if TYPE_CHECKING:
    from dream_trainer.configs import TrainerConfig
    from dream_trainer.trainer.callback import CallbackCollection
    from dream_trainer.trainer.context_batches import ContextParallelBatches
    from dream_trainer.world import DistributedWorld

logger = logging.getLogger("dream_trainer.trainer")


class NonFiniteGradientError(RuntimeError):
    """The total gradient norm was NaN or infinite."""


def gradient_sync_switches(parts: dict[str, list[nn.Module]]) -> list[Callable[[bool], None]]:
    """Functions that turn data-parallel gradient reduction on or off, one per wrapper.

    Found once, so switching on every micro-batch does not walk the module tree.
    """
    switches: list[Callable[[bool], None]] = []
    for model in (part for model_parts in parts.values() for part in model_parts):
        if isinstance(model, FSDPModule):
            switches.append(model.set_requires_gradient_sync)
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            switches.append(functools.partial(setattr, model, "require_backward_grad_sync"))
        else:
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    switches.append(functools.partial(_set_sync_here, module))
    return switches


def _set_sync_here(module: FSDPModule, enabled: bool) -> None:
    module.set_requires_gradient_sync(enabled, recurse=False)


class GradientStepping:
    """The part of :class:`BaseTrainer` that turns losses into optimizer steps."""

    # Provided by BaseTrainer.
    config: TrainerConfig
    _context_batches: ContextParallelBatches
    world: DistributedWorld
    callbacks: CallbackCollection
    global_step: int

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def named_models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def model_parts(self) -> dict[str, list[nn.Module]]:
        raise NotImplementedError

    def named_schedulers(self) -> dict[str, Any]:
        raise NotImplementedError

    def _init_stepping(self) -> None:
        self._micro_batch_index = 0
        self._grad_sync_enabled: bool | None = None
        self._sync_switches: list[Callable[[bool], None]] | None = None
        self._token_mode: bool | None = None
        self._step_tokens: torch.Tensor | None = None
        self._optimizer_params: dict[int, list[torch.Tensor]] = {}
        self._stepped_this_group = 0
        self.last_grad_norm: torch.Tensor | None = None
        self.skipped_steps = 0
        """Optimizer steps skipped for a non-finite gradient norm (a step whose optimizers
        skipped counts once), this run and the runs it resumed."""
        self._skipped_this_group = False
        self._loss_parallel_depth = 0
        # (step, rank-local norm) of steps whose finiteness is checked later (see step()).
        self._unchecked_norms: list[tuple[int, torch.Tensor]] = []

    @property
    def is_accumulating_gradients(self) -> bool:
        """True on every micro-batch of an accumulation group except the last."""
        accum = self.config.training_parameters.gradient_accumulation_steps
        return self._micro_batch_index < accum - 1

    def backward(self, loss: torch.Tensor, num_tokens: Any = None) -> None:
        """Backpropagate ``loss`` for this micro-batch.

        Without ``num_tokens``, ``loss`` is a mean and is divided by the accumulation steps.
        With ``num_tokens`` (this micro-batch's count of valid tokens, a tensor or int),
        ``loss`` is a *sum* over those tokens; before the optimizer step the gradients are
        divided by the token count summed over all micro-batches and data-parallel ranks, so
        uneven micro-batches weigh every token equally. Gradient sync is suppressed on all but
        the last micro-batch of each group.
        """
        self._note_tokens(num_tokens)
        if num_tokens is not None:
            scaled = loss
        else:
            scaled = loss / self.config.training_parameters.gradient_accumulation_steps
        sync = not self.is_accumulating_gradients
        if sync != self._grad_sync_enabled:
            if self._sync_switches is None:
                self._sync_switches = gradient_sync_switches(self.model_parts())
            for switch in self._sync_switches:
                switch(sync)
            self._grad_sync_enabled = sync
        with self.loss_parallel():
            scaled.backward()

    def _note_tokens(self, num_tokens: Any) -> None:
        """Record this micro-batch's token count (token-normalized mode) or that there is none."""
        token_mode = num_tokens is not None
        if self._token_mode is not None and self._token_mode != token_mode:
            raise ValueError(
                "backward() was called both with and without num_tokens inside one optimizer "
                "step; pass num_tokens on every micro-batch or on none"
            )
        self._token_mode = token_mode
        if token_mode:
            count = torch.as_tensor(num_tokens, dtype=torch.float32, device=self.device).reshape(())
            self._step_tokens = count if self._step_tokens is None else self._step_tokens + count

    def loss_parallel(self) -> AbstractContextManager[None]:
        """Context for computing (and backpropagating) a loss on vocab-sharded DTensor logits.

        Active only when tensor parallelism and ``loss_parallel`` are both on; a no-op otherwise.
        Re-entrant (torch's own context is not), and :meth:`backward` enters it by itself.
        """
        if not self.world.loss_parallel_enabled or self._loss_parallel_depth:
            return _NO_CONTEXT  # entered per micro-batch: no generator-based context here
        return self._entered_loss_parallel()

    @contextmanager
    def _entered_loss_parallel(self) -> Iterator[None]:
        from torch.distributed.tensor.parallel import loss_parallel

        self._loss_parallel_depth += 1
        try:
            with loss_parallel():
                yield
        finally:
            self._loss_parallel_depth -= 1

    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        key = id(optimizer)
        if key not in self._optimizer_params:
            self._optimizer_params[key] = [p for g in optimizer.param_groups for p in g["params"]]
        return self._optimizer_params[key]

    def _normalize_by_tokens(self, params: list[torch.Tensor]) -> None:
        assert self._step_tokens is not None
        total = self._step_tokens.clone()
        mesh = self.world.get_mesh("dp_cp")
        if mesh.size() > 1:
            dist.all_reduce(total, group=mesh.get_group())
        # Data-parallel wrappers already averaged over dp_cp ranks; undo that, then divide.
        scale_grads_(params, mesh.size() / total.clamp(min=1.0))

    def _before_parameters_change(self) -> None:
        """Runs right before an optimizer step (an async checkpoint waits for its copy here)."""

    def _after_parameters_change(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs right after ``optimizer`` stepped (float8 scales are precomputed here)."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Clip, step ``optimizer`` and its schedulers, then zero its gradients.

        Returns False when a non-finite gradient norm made it skip the step
        (``on_non_finite_grad="skip"``); raises :class:`NonFiniteGradientError` by default.
        """
        if self.is_accumulating_gradients:
            raise RuntimeError(
                "step() was called while accumulating gradients (micro-batch "
                f"{self._micro_batch_index + 1} of "
                f"{self.config.training_parameters.gradient_accumulation_steps}); "
                "guard it with `if not self.is_accumulating_gradients:`"
            )
        # No update from a step whose attention ignored context parallelism.
        self._context_batches.check_attention_used("training")
        params = self._params_of(optimizer)
        training = self.config.training_parameters
        if self._token_mode:
            self._normalize_by_tokens(params)
        pp_mesh = self.world.get_mesh("pp") if self.world.pp_enabled else None
        norm = clip_grads_and_norm_(params, training.gradient_clip_val, extra_mesh=pp_mesh)
        self.last_grad_norm = norm
        stepped = True
        if training.on_non_finite_grad == "error" and self._defer_non_finite_check:
            # No host sync per step on an accelerator: checked in bulk by check_gradient_norms.
            self._unchecked_norms.append((self.global_step, norm.detach()))
            if len(self._unchecked_norms) >= _MAX_UNCHECKED_NORMS:
                self.check_gradient_norms()
        elif not math.isfinite(norm.item()):  # one host read (isfinite is several ops)
            if training.on_non_finite_grad == "error":
                raise _non_finite_error(float(norm.item()), self.global_step, self.world.rank)
            logger.warning("skipping step %d: gradient norm is %s", self.global_step, norm.item())
            if not self._skipped_this_group:
                self.skipped_steps += 1
                self._skipped_this_group = True
            stepped = False
        if stepped:
            self.callbacks.pre_optimizer_step(optimizer)
            self._before_parameters_change()
            optimizer.step()
            self._after_parameters_change(optimizer)
            for scheduler in self.named_schedulers().values():
                if getattr(scheduler, "optimizer", None) is optimizer:
                    scheduler.step()
            self.callbacks.post_optimizer_step(optimizer)
        self.callbacks.pre_optimizer_zero_grad(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.callbacks.post_optimizer_zero_grad(optimizer)
        self._stepped_this_group += 1
        return stepped

    @property
    def _defer_non_finite_check(self) -> bool:
        """Check gradient norms in bulk rather than per step (accelerators: no per-step sync)."""
        return self.device.type != "cpu"

    def check_gradient_norms(self) -> None:
        """Raise :class:`NonFiniteGradientError` for the first non-finite norm not checked yet.

        One host sync for all of them. The loop calls it at log steps, before checkpoints and at
        the end of ``fit``; steps check immediately on the CPU and with ``"skip"``.
        """
        pending, self._unchecked_norms = self._unchecked_norms, []
        if not pending:
            return
        norms = torch.stack([norm for _, norm in pending])
        finite = torch.isfinite(norms)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        step, value = pending[first][0], float(norms[first].item())
        raise _non_finite_error(value, step, self.world.rank, checked_at=self.global_step)

    def _end_accumulation_group(self) -> None:
        self._token_mode = None
        self._step_tokens = None
        self._stepped_this_group = 0
        self._skipped_this_group = False


_NO_CONTEXT = nullcontext()

_MAX_UNCHECKED_NORMS = 100
"""Steps a deferred check may fall behind even without a log step."""


def _non_finite_error(
    value: float, step: int, rank: int, checked_at: int | None = None
) -> NonFiniteGradientError:
    late = ""
    if checked_at is not None and checked_at != step:
        late = (
            f" (found at step {checked_at} by the deferred check: steps {step} to "
            f"{checked_at - 1} were applied with it; no checkpoint was written since)"
        )
    return NonFiniteGradientError(
        f"the total gradient norm is {value} at step {step} on rank {rank}{late}. Lower the "
        "learning rate, set gradient_clip_val, check the inputs for NaN/inf, or set "
        "training_parameters.on_non_finite_grad='skip'."
    )
