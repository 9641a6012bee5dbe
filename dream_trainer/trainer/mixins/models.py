"""ModelSetupMixin: models declared on meta, parallelized in a fixed order, then materialized."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from dream_trainer.configs import ModelSetupConfigMixin, TrainerConfig
from dream_trainer.parallel import FullyShard, ParallelPlan
from dream_trainer.parallel import apply_fully_shard as apply_fully_shard_plan
from dream_trainer.parallel import apply_tensor_parallel as apply_tensor_parallel_plan
from dream_trainer.parallel.activation_checkpointing import checkpoint_blocks
from dream_trainer.parallel.async_tp import enable_async_tensor_parallel
from dream_trainer.parallel.blocks import declared_blocks
from dream_trainer.parallel.compile import compile_module, guard_compiled_inputs
from dream_trainer.parallel.float8 import (
    check_float8_layout,
    convert_to_float8,
    precompute_float8_scales,
)
from dream_trainer.parallel.fully_shard import (
    ROOT_AWARE_RESHARD_DEFAULT,
    fully_shard,
    set_reshard_after_forward,
)
from dream_trainer.parallel.materialize import load_full_weights
from dream_trainer.parallel.pipeline import (
    PipelineRunner,
    balanced_stages,
    merge_parts,
    split_model,
    stage_indices,
    stage_modules,
)
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.checks import (
    check_data_parallel_coverage,
    check_materialized,
    check_one_device_per_model,
    check_tensor_parallel_applied,
)
from dream_trainer.trainer.mixins.meta_placement import MovesStayOnMeta
from dream_trainer.trainer.mixins.model_aliases import aliases_into, drop_aliases, fsdp_replicate
from dream_trainer.trainer.mixins.registry import assigned_during
from dream_trainer.trainer.model_size import measure_configured_models
from dream_trainer.world import ModelSize

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

    Order: ``configure_models`` (meta) -> ``apply_pipeline_parallel`` (split into this rank's
    parts) -> then for each part: ``apply_float8_training`` -> ``apply_tensor_parallel`` ->
    ``apply_context_parallel`` -> ``apply_activation_checkpointing`` -> ``apply_compile`` ->
    ``apply_fully_shard`` (dp_shard x
    cp > 1, or mixed precision / offload without replication) or ``apply_replicate``
    (dp_replicate > 1) -> materialize -> ``init_weights`` -> checks. Each hook runs only when its
    layout asks for it. While a hook runs for a part, ``self.<model>`` is that part, so hooks
    written for a whole model work on pipeline stages unchanged.
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
        """Prepare models for sequences split over ``cp_mesh``; default: nothing to change.

        Context parallelism is per batch: the trainer cuts every batch along the sequence and
        ``context_parallel_attention`` (which the model must call) exchanges keys and values.
        Override to swap in such an attention for a model that does not call it.
        """

    def apply_pipeline_parallel(self, pp_mesh: DeviceMesh) -> dict[str, list[nn.Module]]:
        """Split each model into the stages this rank holds; returns ``{name: [part, ...]}``.

        One part per index of :meth:`pipeline_stage_indices`, in that order. The default cuts
        the model's blocks (its ``nn.ModuleDict`` / ``nn.ModuleList``) into balanced stages, or
        follows ``pipeline_parallel_config.split_points``; parameter names stay those of the
        unsplit model. Override it to build the parts yourself.
        """
        config = self.config.device_parameters.pipeline_parallel_config
        num_stages = self.pipeline_num_stages
        parts: dict[str, list[nn.Module]] = {}
        for name, model in self.named_models().items():
            stages = config.split_points or balanced_stages(
                model, num_stages, config.first_stage_weight, config.last_stage_weight
            )
            if len(stages) != num_stages:
                raise ValueError(
                    f"pipeline_parallel_config.split_points lists {len(stages)} stages, but "
                    f"pipeline_parallel={pp_mesh.size()} x stages_per_rank="
                    f"{config.resolved_stages_per_rank()} needs {num_stages}"
                )
            keep = stage_modules(model, stages)
            parts[name] = [split_model(model, keep[i]) for i in self.pipeline_stage_indices()]
        return parts

    @property
    def pipeline_num_stages(self) -> int:
        """Stages each model is split into: ``pipeline_parallel x stages_per_rank``."""
        config = self.config.device_parameters.pipeline_parallel_config
        return self.world.pp_size * config.resolved_stages_per_rank()

    def pipeline_stage_indices(self) -> list[int]:
        """The stage indices this rank holds, in the order its schedule runs them."""
        config = self.config.device_parameters.pipeline_parallel_config
        return stage_indices(config, self.world.pp_rank, self.world.pp_size)

    def apply_activation_checkpointing(self) -> None:
        """Recompute blocks' activations in backward; default: the declared blocks, fully or
        selectively, as ``activation_checkpoint_config`` says."""
        config = self.config.device_parameters.activation_checkpoint_config
        for name, model in self.named_models().items():
            blocks = declared_blocks(model)
            if not blocks:
                raise RuntimeError(
                    f"checkpoint_activations=True but model {name!r} ({type(model).__name__}) "
                    "keeps no blocks in an nn.ModuleList/ModuleDict attribute; override "
                    f"{type(self).__name__}.apply_activation_checkpointing"
                )
            checkpoint_blocks(blocks, config.mode, config.every_n_blocks)

    def apply_float8_training(self) -> None:
        """Swap models' ``nn.Linear`` layers for torchao ``Float8Linear`` (``float8=True``).

        Runs first, on the meta device, so tensor parallelism picks float8 styles and FSDP
        can all-gather in float8. Default: every Linear not in ``float8_config.exclude_modules``.
        """
        config = self.config.device_parameters.float8_config
        for model in self.named_models().values():
            convert_to_float8(model, config)

    def _after_parameters_change(self, optimizer: torch.optim.Optimizer) -> None:
        super()._after_parameters_change(optimizer)
        params = self.config.device_parameters
        if params.float8 and params.float8_config.precompute_fsdp_scales:
            owners = self.__dict__.setdefault("_float8_owners", {})
            if id(optimizer) not in owners:  # found once: _model_of walks every parameter
                owners[id(optimizer)] = self._model_of(optimizer)
            precompute_float8_scales(owners[id(optimizer)])

    def apply_compile(self) -> None:
        """``torch.compile`` each declared block in place (or the whole model)."""
        backend = self.config.device_parameters.compile_backend
        for model in self.named_models().values():
            for module in declared_blocks(model) or [model]:
                compile_module(module, backend=backend)

    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        """FSDP2 per block (``FullyShard`` modules, else declared blocks), then each root."""
        for model in self.named_models().values():
            if _contains_plan(model, FullyShard):
                apply_fully_shard_plan(model, config)
            else:
                for block in declared_blocks(model):
                    fully_shard(block, **config)
            if not isinstance(model, FSDPModule):
                fully_shard(model, **config)

    def apply_replicate(self, dp_replicate_mesh: DeviceMesh) -> None:
        """Replicate each model over ``dp_replicate_mesh`` (FSDP2-based, handles TP weights).

        A frozen model (no trainable parameter) is left as it is: it has no gradients to
        synchronize, and materializing places it on the device like any model.
        """
        replicate = fsdp_replicate()
        config = self.world.fsdp_config
        for model in self.named_models().values():
            if not any(p.requires_grad for p in model.parameters()):
                continue
            replicate(
                model,
                mesh=dp_replicate_mesh,
                mp_policy=config["mp_policy"],
                offload_policy=config["offload_policy"],
            )

    def measure_model_size(self) -> ModelSize:
        """Sizes the models for the automatic layout: runs ``configure_models`` on the meta
        device (before any mesh exists; the world then reports tensor_parallel 1), counts, and
        discards them."""
        overrides_tp = type(self).apply_tensor_parallel is not ModelSetupMixin.apply_tensor_parallel
        return measure_configured_models(self, self.configure_models, tensor_parallel=overrides_tp)

    # Machinery

    def named_models(self) -> dict[str, nn.Module]:
        current = getattr(self, "_current_parts", None)
        if current is not None:
            return dict(current)
        return {name: getattr(self, name) for name in getattr(self, "_model_names", ())}

    def model_parts(self) -> dict[str, list[nn.Module]]:
        """Each model as the parts this rank runs: ``[model]``, or its pipeline stages."""
        parts = getattr(self, "_parts", None)
        if parts is None:
            return {name: [model] for name, model in self.named_models().items()}
        return {name: list(p) for name, p in parts.items()}

    def configure(self) -> None:
        super().configure()
        with assigned_during(self, _is_model) as found, torch.device("meta"), MovesStayOnMeta():
            self.configure_models()
        models = drop_aliases(found)
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
        check_one_device_per_model(self.named_models(), self.world.world_size)
        self._split_into_parts()
        self._parallelize_parts()
        self._materialize_and_init()
        parts = {
            f"{name}[stage {i}]" if len(p) > 1 or self.world.pp_enabled else name: part
            for name, p in self.model_parts().items()
            for i, part in zip(self._stage_labels(len(p)), p)
        }
        check_materialized(parts)
        if self.world.tp_enabled:
            check_tensor_parallel_applied(parts, type(self).__name__)
        check_data_parallel_coverage(parts, self.world, type(self).__name__)
        if self.world.pp_enabled:
            self._assemble_pipelines()

    def _stage_labels(self, count: int) -> list[int]:
        return self.pipeline_stage_indices() if self.world.pp_enabled else list(range(count))

    def _split_into_parts(self) -> None:
        if not self.world.pp_enabled:
            self._parts = {name: [model] for name, model in self.named_models().items()}
            return
        parts = self.apply_pipeline_parallel(self.world.get_mesh("pp"))
        expected = len(self.pipeline_stage_indices())
        for name in self._model_names:
            got = parts.get(name) if isinstance(parts, dict) else None
            if not isinstance(got, list) or len(got) != expected:
                raise TypeError(
                    f"{type(self).__name__}.apply_pipeline_parallel must return {{model name: "
                    f"[one module per stage index {self.pipeline_stage_indices()}]}}, but for "
                    f"{name!r} it returned {type(got).__name__}"
                    + (f" of {len(got)}" if isinstance(got, list) else "")
                )
        self._parts = {name: list(parts[name]) for name in self._model_names}

    @contextmanager
    def _bound_to_parts(self, index: int) -> Iterator[dict[str, nn.Module]]:
        """``self.<model>`` (and named_models()) is the ``index``-th part of each model."""
        current = {n: p[index] for n, p in self._parts.items() if index < len(p)}
        with self._models_swapped(current):
            self._current_parts: dict[str, nn.Module] | None = current
            try:
                yield current
            finally:
                self._current_parts = None
                for name in current:  # a hook may have replaced the module object
                    self._parts[name][index] = getattr(self, name)

    def _parallelize_parts(self) -> None:
        world, params = self.world, self.config.device_parameters
        if params.async_tensor_parallel:
            enable_async_tensor_parallel(world.get_mesh("tp"))
        for index in range(max(len(p) for p in self._parts.values())):
            with self._bound_to_parts(index):
                self._parallelize_current_parts()
        if not world.pp_enabled:  # the model is its one part (a hook may have wrapped it)
            for name, parts in self._parts.items():
                object.__setattr__(self, name, parts[0])

    def _parallelize_current_parts(self) -> None:
        world, params = self.world, self.config.device_parameters
        if params.float8:
            tp_backend = (
                dist.get_backend(world.get_mesh("tp").get_group()) if world.tp_enabled else None
            )
            check_float8_layout(params.float8_config, world.fsdp_enabled, tp_backend)
            self.apply_float8_training()
        if world.tp_enabled:
            self.apply_tensor_parallel(world.get_mesh("tp"))
        if world.cp_enabled:
            self.apply_context_parallel(world.get_mesh("cp"))
        if params.checkpoint_activations:
            self.apply_activation_checkpointing()
        if params.compile_model:
            self.apply_compile()
            # Also covers modules a user's apply_compile compiled with torch directly.
            for model in self.named_models().values():
                guard_compiled_inputs(model)
        # Mixed precision and CPU offload are FSDP policies; without data parallelism they
        # still take effect through FSDP on a one-rank mesh rather than being dropped.
        wants_policies = bool(params.param_dtype or params.reduce_dtype or params.cpu_offload)
        if world.fsdp_enabled or (wants_policies and not world.dp_replicate_enabled):
            self.apply_fully_shard(world.fsdp_config)
            self._apply_resharding_policy()
        elif world.dp_replicate_enabled:
            self.apply_replicate(world.get_mesh("dp_replicate"))

    def _assemble_pipelines(self) -> None:
        """Give each split model its merged view and its schedule runner."""
        indices, device = self.pipeline_stage_indices(), self.device
        config = self.config.device_parameters.pipeline_parallel_config
        self._pipelines: dict[int, PipelineRunner] = {}
        for name, parts in self._parts.items():
            merged = merge_parts(parts, indices)
            for alias, module in aliases_into(self, {name: merged}).items():
                object.__setattr__(self, alias, module)
            object.__setattr__(self, name, merged)
            self._pipelines[id(merged)] = PipelineRunner(
                parts, indices, self.pipeline_num_stages, config, self.world.get_mesh("pp"), device
            )

    def _apply_resharding_policy(self) -> None:
        # reshard_after_forward=False (or pipeline parallelism, whose microbatches reuse the
        # gathered parameters) applies to every FSDP module, whatever apply_fully_shard passed.
        keep = not self.config.device_parameters.reshard_after_forward or self.world.pp_enabled
        for model in self.named_models().values():
            if keep:
                set_reshard_after_forward(model, False)
            elif isinstance(model, FSDPModule) and not ROOT_AWARE_RESHARD_DEFAULT:
                # Backward needs the root's parameters first; resharding them adds an all-gather.
                model.set_reshard_after_forward(False, recurse=False)

    def _materialize_and_init(self) -> None:
        device = "cpu" if self.config.device_parameters.cpu_offload else self.device
        for parts in self._parts.values():
            for part in parts:
                part.to_empty(device=device)
        if self.config.weight_init == "sharded":
            for index in range(max(len(p) for p in self._parts.values())):
                with self._bound_to_parts(index), torch.no_grad():
                    torch.manual_seed(self.config.seed)
                    self.init_weights()
            return
        full = {n: m.to_empty(device="cpu") for n, m in self._meta_models.items()}
        with self._models_swapped(full), torch.no_grad():
            torch.manual_seed(self.config.seed)
            self.init_weights()
        for name, parts in self._parts.items():
            for part in parts:
                load_full_weights(part, full[name])
        del self._meta_models

    @contextmanager
    def _models_swapped(self, replacements: dict[str, nn.Module]) -> Iterator[None]:
        # Aliases (self.encoder = self.model.encoder) must point into the full copies too, or
        # init_weights would write through them into tensors that are overwritten afterwards.
        replaced: dict[str, nn.Module | None] = {**aliases_into(self, replacements), **replacements}
        originals = {name: getattr(self, name) for name in replaced}
        try:
            for name, model in replaced.items():
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
