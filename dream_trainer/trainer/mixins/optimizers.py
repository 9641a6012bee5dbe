"""OptimizerAndSchedulerSetupMixin: optimizers and LR schedulers, built after models are sharded."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.checkpointing.optimizer_state import optimizer_state_dict
from dream_trainer.trainer.mixins.registry import assigned_during

logger = logging.getLogger("dream_trainer.trainer")


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, torch.optim.Optimizer)


def _is_scheduler(value: Any) -> bool:
    return isinstance(value, torch.optim.lr_scheduler.LRScheduler)


class OptimizerAndSchedulerSetupMixin(BaseTrainer):
    """Runs ``configure_optimizers`` then ``configure_schedulers`` on the sharded models."""

    def configure_optimizers(self) -> None:
        """Assign optimizers over ``self.<model>.parameters()`` to ``self``."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers")

    def configure_schedulers(self) -> None:
        """Optionally assign LR schedulers; each steps with its optimizer in ``self.step``."""

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {n: getattr(self, n) for n in getattr(self, "_optimizer_names", ())}

    def named_schedulers(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in getattr(self, "_scheduler_names", ())}

    def setup(self) -> None:
        super().setup()
        if self.serving_only:  # inference updates no weights
            self._optimizer_names, self._scheduler_names = [], []
            return
        with assigned_during(self, _is_optimizer) as optimizers:
            self.configure_optimizers()
        if not optimizers:
            raise RuntimeError(
                f"{type(self).__name__}.configure_optimizers assigned no torch.optim.Optimizer "
                "to self (e.g. self.optimizer = torch.optim.AdamW(self.model.parameters()))"
            )
        self._optimizer_names = list(optimizers)
        with assigned_during(self, _is_scheduler) as schedulers:
            self.configure_schedulers()
        self._scheduler_names = list(schedulers)
        self._check_optimized_parameters()

    def _check_optimized_parameters(self) -> None:
        optimized = {
            id(p)
            for opt in self.named_optimizers().values()
            for g in opt.param_groups
            for p in g["params"]
        }
        models = self.named_models()
        owned = {id(p) for m in models.values() for p in m.parameters()}
        stale = optimized - owned
        if models and stale:
            raise RuntimeError(
                f"an optimizer holds {len(stale)} tensors that are not parameters of the set-up "
                "models; build optimizers in configure_optimizers from self.<model>.parameters() "
                "(parameters are replaced when models are sharded)"
            )
        for name, model in models.items():
            missed = [
                n for n, p in model.named_parameters() if p.requires_grad and id(p) not in optimized
            ]
            if missed:
                logger.warning(
                    "%d trainable parameters of %s are in no optimizer (first: %s); they will not "
                    "train. Set requires_grad=False on them if that is intended.",
                    len(missed),
                    name,
                    missed[0],
                )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["optimizers"] = {
            name: optimizer_state_dict(self._model_of(opt), opt)
            for name, opt in self.named_optimizers().items()
        }
        state["schedulers"] = {n: s.state_dict() for n, s in self.named_schedulers().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for name, opt in self.named_optimizers().items():
            if name in state_dict.get("optimizers", {}):
                set_optimizer_state_dict(self._model_of(opt), opt, state_dict["optimizers"][name])
        for name, scheduler in self.named_schedulers().items():
            if name in state_dict.get("schedulers", {}):
                scheduler.load_state_dict(state_dict["schedulers"][name])
