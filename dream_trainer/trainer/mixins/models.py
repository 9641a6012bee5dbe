"""ModelSetupMixin: models declared on meta, parallelized in a fixed order, then materialized."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from dream_trainer.configs import ModelSetupConfigMixin, TrainerConfig
from dream_trainer.parallel import FullyShard, ParallelPlan
from dream_trainer.parallel import apply_fully_shard as apply_fully_shard_plan
from dream_trainer.parallel import apply_tensor_parallel as apply_tensor_parallel_plan
from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.parallel.materialize import load_full_weights
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.checks import (
    check_data_parallel_coverage,
    check_materialized,
    check_tensor_parallel_applied,
)
from dream_trainer.trainer.mixins.registry import assigned_during

logger = logging.getLogger("dream_trainer.trainer")


class _ModelSetupConfig(ModelSetupConfigMixin, TrainerConfig):
    pass


def _is_model(value: Any) -> bool:
    # A loss module or activation holds no parameters: it is not a model to shard or train.
    return isinstance(value, nn.Module) and any(True for _ in value.parameters())


def _contains_plan(model: nn.Module, protocol: type) -> bool:
    return any(isinstance(m, protocol) for m in model.modules())


class ModelSetupMixin(BaseTrainer):
    """Builds models on meta, applies the parallelism hooks in order, materializes, initializes.

    Order: ``configure_models`` (meta) -> ``apply_tensor_parallel`` -> ``apply_context_parallel``
    -> ``apply_pipeline_parallel`` -> ``apply_activation_checkpointing`` -> ``apply_compile`` ->
    ``apply_fully_shard`` (dp_shard x cp > 1, or mixed precision / offload without replication)
    or ``apply_replicate`` (dp_replicate > 1) -> materialize -> ``init_weights`` -> checks.
    Each hook runs only when its layout asks for it.
    """

    config: _ModelSetupConfig  # type: ignore[assignment]

    # User hooks

    def configure_models(self) -> None:
        """Assign models to ``self`` (they are built on the meta device)."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_models")

    def init_weights(self) -> None:
        """Fill every parameter and buffer; default: ``model.init_weights()`` or ``reset_parameters``."""
        for model in self.named_models().values():
            init = getattr(model, "init_weights", None)
            if callable(init):
                init()
                continue
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()

    def apply_tensor_parallel(self, tp_mesh: DeviceMesh) -> None:
        """Shard models over ``tp_mesh``; default: their ``parallelize_plan`` (ParallelPlan)."""
        applied = False
        for model in self.named_models().values():
            if _contains_plan(model, ParallelPlan):
                apply_tensor_parallel_plan(
                    model, tp_mesh, loss_parallel=self.world.loss_parallel_enabled
                )
                applied = True
        if not applied:
            check_tensor_parallel_applied(self.named_models(), type(self).__name__)

    def apply_context_parallel(self, cp_mesh: DeviceMesh) -> None:
        """Prepare models for sequence sharding over ``cp_mesh``; no default exists yet."""
        raise NotImplementedError(
            f"context_parallel={cp_mesh.size()} was requested but {type(self).__name__} does not "
            "implement apply_context_parallel(self, cp_mesh); implement it or set "
            "context_parallel=1"
        )

    def apply_pipeline_parallel(self, pp_mesh: DeviceMesh) -> None:
        """Split models into pipeline stages over ``pp_mesh``; no default exists yet."""
        raise NotImplementedError(
            f"pipeline_parallel={pp_mesh.size()} was requested but {type(self).__name__} does "
            "not implement apply_pipeline_parallel(self, pp_mesh); implement it or set "
            "pipeline_parallel=1"
        )

    def apply_activation_checkpointing(self) -> None:
        """Recompute each block's activations in backward; default: every declared block."""
        from torch.distributed._composable import checkpoint

        for name, model in self.named_models().items():
            blocks = declared_blocks(model)
            if not blocks:
                raise RuntimeError(
                    f"checkpoint_activations=True but model {name!r} ({type(model).__name__}) "
                    "keeps no blocks in an nn.ModuleList/ModuleDict attribute; override "
                    f"{type(self).__name__}.apply_activation_checkpointing"
                )
            for block in blocks:
                checkpoint(block)

    def apply_compile(self) -> None:
        """``torch.compile`` each declared block in place (or the whole model)."""
        for model in self.named_models().values():
            for module in declared_blocks(model) or [model]:
                module.compile()

    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        """FSDP2 per block (``FullyShard`` modules, else declared blocks), then each root."""
        pp_enabled = self.world.pp_enabled
        for model in self.named_models().values():
            if _contains_plan(model, FullyShard):
                apply_fully_shard_plan(model, config, pp_enabled=pp_enabled)
            else:
                root_config = {**config, "reshard_after_forward": False} if pp_enabled else config
                for block in declared_blocks(model):
                    fully_shard(block, **root_config)
            if not isinstance(model, FSDPModule):
                fully_shard(model, **config)

    def apply_replicate(self, dp_replicate_mesh: DeviceMesh) -> None:
        """Replicate each model over ``dp_replicate_mesh`` (FSDP2-based, handles TP weights)."""
        replicate = _fsdp_replicate()
        config = self.world.fsdp_config
        for model in self.named_models().values():
            replicate(
                model,
                mesh=dp_replicate_mesh,
                mp_policy=config["mp_policy"],
                offload_policy=config["offload_policy"],
            )

    # Machinery

    def named_models(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in getattr(self, "_model_names", ())}

    def configure(self) -> None:
        super().configure()
        with assigned_during(self, _is_model) as found, torch.device("meta"):
            self.configure_models()
        models = _drop_aliases(found)
        if not models:
            raise RuntimeError(
                f"{type(self).__name__}.configure_models assigned no nn.Module with parameters "
                "to self (e.g. self.model = MyModel())"
            )
        self._model_names = list(models)
        if self.config.weight_init == "full":
            # The unparallelized structure, kept on meta so init_weights can run on a full copy.
            self._meta_models = {n: copy.deepcopy(m) for n, m in models.items()}

    def setup(self) -> None:
        super().setup()
        self._parallelize_models()
        self._materialize_and_init()
        models = self.named_models()
        check_materialized(models)
        if self.world.tp_enabled:
            check_tensor_parallel_applied(models, type(self).__name__)
        check_data_parallel_coverage(models, self.world, type(self).__name__)

    def _parallelize_models(self) -> None:
        world, params = self.world, self.config.device_parameters
        if world.tp_enabled:
            self.apply_tensor_parallel(world.get_mesh("tp"))
        if world.cp_enabled:
            self.apply_context_parallel(world.get_mesh("cp"))
        if world.pp_enabled:
            self.apply_pipeline_parallel(world.get_mesh("pp"))
        if params.checkpoint_activations:
            self.apply_activation_checkpointing()
        if params.async_tensor_parallel:
            enable_async_tensor_parallel(world.get_mesh("tp"))
        if params.compile_model:
            self.apply_compile()
        # Mixed precision and CPU offload are FSDP policies; without data parallelism they
        # still take effect through FSDP on a one-rank mesh rather than being dropped.
        wants_policies = bool(params.param_dtype or params.reduce_dtype or params.cpu_offload)
        if world.fsdp_enabled or (wants_policies and not world.dp_replicate_enabled):
            self.apply_fully_shard(world.fsdp_config)
        elif world.dp_replicate_enabled:
            self.apply_replicate(world.get_mesh("dp_replicate"))

    def _materialize_and_init(self) -> None:
        device = "cpu" if self.config.device_parameters.cpu_offload else self.device
        for model in self.named_models().values():
            model.to_empty(device=device)
        if self.config.weight_init == "sharded":
            torch.manual_seed(self.config.seed)
            with torch.no_grad():
                self.init_weights()
            return
        full = {n: m.to_empty(device="cpu") for n, m in self._meta_models.items()}
        with self._models_swapped(full), torch.no_grad():
            torch.manual_seed(self.config.seed)
            self.init_weights()
        for name, model in self.named_models().items():
            load_full_weights(model, full[name])
        del self._meta_models

    @contextmanager
    def _models_swapped(self, replacements: dict[str, nn.Module]) -> Iterator[None]:
        # Aliases (self.encoder = self.model.encoder) must point into the full copies too, or
        # init_weights would write through them into tensors that are overwritten afterwards.
        replacements = {**_aliases_into(self, replacements), **replacements}
        originals = {name: getattr(self, name) for name in replacements}
        try:
            for name, model in replacements.items():
                object.__setattr__(self, name, model)
            yield
        finally:
            for name, model in originals.items():
                object.__setattr__(self, name, model)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state["models"] = {n: get_model_state_dict(m) for n, m in self.named_models().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        for name, model in self.named_models().items():
            if name in state_dict.get("models", {}):
                set_model_state_dict(model, state_dict["models"][name])


def _drop_aliases(found: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Keep each module once, and drop modules that live inside another found module."""
    kept: dict[str, nn.Module] = {}
    for name, module in found.items():
        inside_other = any(
            other is not module and any(sub is module for sub in other.modules())
            for other in found.values()
        )
        if inside_other or any(module is k for k in kept.values()):
            continue
        kept[name] = module
    return kept


def _aliases_into(owner: Any, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Attributes of ``owner`` that are submodules of a replaced model, mapped into its copy."""
    found: dict[str, nn.Module] = {}
    for model_name, copy_ in replacements.items():
        paths = {id(m): path for path, m in getattr(owner, model_name).named_modules() if path}
        for attr, value in vars(owner).items():
            if attr not in replacements and isinstance(value, nn.Module) and id(value) in paths:
                found[attr] = copy_.get_submodule(paths[id(value)])
    return found


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Let torch.compile overlap TP collectives with matmuls (symmetric memory on the TP group)."""
    try:
        from torch._inductor import config as inductor_config
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError as error:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            "async_tensor_parallel=True needs torch.distributed._symmetric_memory, which this "
            "torch build lacks; set async_tensor_parallel=False"
        ) from error
    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def _fsdp_replicate() -> Any:
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as error:  # pragma: no cover - present in every supported torch
        raise RuntimeError(
            "this torch has no FSDP2-based replicate (torch.distributed._composable."
            "replicate_with_fsdp); use DeviceParameters.HSDP or override apply_replicate"
        ) from error
    return replicate
