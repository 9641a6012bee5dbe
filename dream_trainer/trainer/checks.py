"""Checks run around setup, so a run never trains silently unsharded or unsynchronized, nor
from models placed in a way the layout cannot take over."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dream_trainer.world import DistributedWorld

# Which base mesh dims a mesh name stands for.
_BASE_DIMS = {
    "dp_replicate": {"dp_replicate"},
    "dp_shard": {"dp_shard"},
    "cp": {"cp"},
    "dp": {"dp_replicate", "dp_shard"},
    "dp_shard_cp": {"dp_shard", "cp"},
    "dp_cp": {"dp_replicate", "dp_shard", "cp"},
}


def check_one_device_per_model(models: dict[str, nn.Module], world_size: int) -> None:
    """On more than one rank, no model arrives with its parameters spread over several devices.

    That is the ``device_map="auto"`` habit (one process driving all of a node's GPUs), which
    contradicts one device per rank. Parameters on meta are not placed yet and do not count.
    """
    if world_size <= 1:
        return
    for name, model in models.items():
        counts: dict[str, int] = {}
        for param in model.parameters():
            if not param.is_meta:
                counts[str(param.device)] = counts.get(str(param.device), 0) + 1
        if len(counts) < 2:
            continue
        found = ", ".join(f"{device} ({n} parameters)" for device, n in sorted(counts.items()))
        raise RuntimeError(
            f"model {name!r} ({type(model).__name__}) has its parameters on {len(counts)} "
            f'devices in this rank: {found}, as device_map="auto" places them; but this run '
            f"has {world_size} ranks and gives each rank one device. Build the model on one "
            "device, or leave it on meta (configure_models builds it there), and let the layout "
            "place and shard it; to split a model too big for one device, use tensor_parallel "
            "or pipeline_parallel instead of device_map"
        )


def check_materialized(models: dict[str, nn.Module]) -> None:
    """No parameter, buffer or plain tensor attribute is left on the meta device."""
    for name, model in models.items():
        for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(
                    f"{name}.{tensor_name} is still on the meta device after setup; create every "
                    "tensor in configure_models (not in forward) so it is materialized, and fill "
                    "it in init_weights"
                )
        for path, module in model.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, torch.Tensor) and value.is_meta:
                    where = ".".join(p for p in (name, path, attr) if p)
                    raise RuntimeError(
                        f"{where} is a plain tensor attribute still on the meta device: "
                        "materialization only moves parameters and buffers. Register it with "
                        f"self.register_buffer({attr!r}, tensor, persistent=False) and fill it "
                        "in init_weights"
                    )


def check_tensor_parallel_applied(models: dict[str, nn.Module], trainer: str) -> None:
    """With TP on, some model has parameters sharded over the ``tp`` mesh."""
    for model in models.values():
        for param in model.parameters():
            if isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ()):
                return
    described = ", ".join(f"{n} ({type(m).__name__})" for n, m in models.items())
    raise RuntimeError(
        f"tensor_parallel > 1 was requested but no parameter of {described} is sharded over the "
        "tp mesh. Implement parallelize_plan on the model's modules (dream_trainer.parallel."
        f"ParallelPlan) or override {trainer}.apply_tensor_parallel(self, tp_mesh)."
    )


def _required_dp_dims(world: DistributedWorld) -> set[str]:
    return {dim for dim in ("dp_replicate", "dp_shard", "cp") if world.size(dim) > 1}


def _covered_dims(param: DTensor) -> set[str]:
    covered: set[str] = set()
    for name in param.device_mesh.mesh_dim_names or ():
        covered |= _BASE_DIMS.get(name, set())
    return covered


def _managed_by_composable_replicate(model: nn.Module) -> bool:
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # pragma: no cover - layout of torch internals varies
        return False
    return any("replicate" in (_get_registry(m) or {}) for m in model.modules())


def check_data_parallel_coverage(
    models: dict[str, nn.Module], world: DistributedWorld, trainer: str
) -> None:
    """Every trainable parameter's gradient is reduced over every data-parallel dimension."""
    required = _required_dp_dims(world)
    if not required:
        return
    for model_name, model in models.items():
        ddp_wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        composable = _managed_by_composable_replicate(model)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if isinstance(param, DTensor):
                missing = required - _covered_dims(param)
                if not missing:
                    continue
                mesh = param.device_mesh.mesh_dim_names
                if composable:
                    raise RuntimeError(
                        f"{model_name}.{name} is a DTensor on mesh {mesh} and the model is wrapped "
                        "by torch.distributed._composable.replicate, which skips DTensor "
                        "parameters: their gradients would never be averaged across "
                        f"{'/'.join(sorted(missing))} ranks. Use the default {trainer}."
                        "apply_replicate (FSDP2-based replicate) or fully_shard with the "
                        "mesh from world.fsdp_config."
                    )
                raise RuntimeError(
                    f"{model_name}.{name} is a DTensor on mesh {mesh}, not sharded or replicated "
                    f"over the data-parallel dims {sorted(missing)}, so its gradients would not "
                    f"be synchronized. Apply fully_shard/replicate to it in {trainer}."
                    "apply_fully_shard / apply_replicate."
                )
            if ddp_wrapped or composable:
                continue
            raise RuntimeError(
                f"{model_name}.{name} is a plain tensor on a run with data-parallel dims "
                f"{sorted(required)}, so nothing averages its gradient across ranks. Wrap "
                f"{type(model).__name__} in {trainer}.apply_fully_shard / apply_replicate (or "
                "keep the defaults)."
            )
