"""Apply tensor parallelism through the :class:`~dream_trainer.parallel.ParallelPlan` protocol."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from dream_trainer.parallel.fully_shard import post_order
from dream_trainer.parallel.protocols import has_parallel_plan, plan_method, unwrap_compiled
from dream_trainer.parallel.styles import ParameterStyle

__all__ = ["PlanKeyError", "apply_tensor_parallel", "resolve_plan_key"]

_WILDCARD_CHARS = frozenset("*?[")


class PlanKeyError(KeyError):
    """A plan key names no submodule or parameter of the module that returned the plan."""

    def __str__(self) -> str:
        # KeyError's default str() is the repr of its argument; show the sentence as written.
        return str(self.args[0]) if self.args else ""


def apply_tensor_parallel(
    module: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool = False
) -> nn.Module:
    """Apply every plan in the tree (``parallelize_plan`` / ``parallel_plan``) to ``tp_mesh``.

    Plans are applied children before parents. Module entries go through torch's
    ``parallelize_module``; bare-parameter entries (``parameter_parallel``) replace the
    parameter with an ``nn.Parameter(DTensor)``. ``loss_parallel`` is passed to each plan so
    the output projection can keep its logits sharded on the vocabulary dimension. Every key
    of every plan is resolved before anything is changed. Returns ``module`` (the same object).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tensor_parallel needs a 1-D tensor-parallel mesh, got a {tp_mesh.ndim}-D "
            f"mesh with dims {tp_mesh.mesh_dim_names}; pass the tp slice, e.g. mesh['tp']."
        )
    plans = [
        (owner, plan)
        for owner in list(post_order(module))
        if has_parallel_plan(owner)
        for plan in _get_plans(owner, loss_parallel)
    ]
    resolved = [(owner, _resolve_plan(owner, plan)) for owner, plan in plans]
    for owner, entries in resolved:
        _apply_plan(owner, entries, tp_mesh)
    return module


def _get_plans(owner: nn.Module, loss_parallel: bool) -> list[dict[str, Any]]:
    """The plan dicts of ``owner``, in application order (a plan may be a tuple of dicts)."""
    method = plan_method(owner)
    plan = method(loss_parallel)
    where = f"{type(owner).__name__}.{method.__name__}(loss_parallel={loss_parallel})"
    parts = list(plan) if isinstance(plan, (tuple, list)) else [plan]
    for part in parts:
        if not isinstance(part, dict):
            raise TypeError(
                f"{where} returned a {type(plan).__name__}, but a plan must be a dict (or a tuple "
                "of dicts) mapping submodule or parameter names to style constructors, e.g. "
                "{'wq': colwise_parallel()}; return a dict (an empty dict for no tensor "
                "parallelism)."
            )
        for key, value in part.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; plan keys must "
                    "be strings naming a submodule or parameter ('' for the module)."
                )
            if not (isinstance(value, ParallelStyle) or callable(value)):
                raise TypeError(
                    f"{where} maps {key!r} to a {type(value).__name__}; values must be style "
                    "constructors such as colwise_parallel() or parameter_parallel()."
                )
    return parts


def _resolve_plan(
    owner: nn.Module, plan: dict[str, Any]
) -> list[tuple[str, Any, list[tuple[str, nn.Module, str | None]]]]:
    return [(key, constructor, resolve_plan_key(owner, key)) for key, constructor in plan.items()]


def _apply_plan(
    owner: nn.Module,
    resolved: list[tuple[str, Any, list[tuple[str, nn.Module, str | None]]]],
    tp_mesh: DeviceMesh,
) -> None:
    for key, constructor, targets in resolved:
        for qualified_name, parent, attr in targets:
            target: nn.Module | nn.Parameter = (
                parent if attr is None else parent._parameters[attr]  # type: ignore[assignment]
            )
            style = constructor if isinstance(constructor, ParallelStyle) else constructor(target)
            where = f"{_plan_name(owner)}[{key!r}] (target {qualified_name!r})"
            if isinstance(target, nn.Parameter):
                if not isinstance(style, ParameterStyle):
                    raise TypeError(
                        f"{where} is a bare parameter, but its constructor returned a "
                        f"{type(style).__name__}; use parameter_parallel(placements)."
                    )
                assert attr is not None
                parent.register_parameter(attr, style.distribute(target, tp_mesh))
            elif isinstance(style, ParallelStyle):
                parallelize_module(target, tp_mesh, style)
            else:
                raise TypeError(
                    f"{where} is a {type(target).__name__} module, but its constructor returned "
                    f"a {type(style).__name__}; module entries need a ParallelStyle, e.g. from "
                    "colwise_parallel()."
                )


def resolve_plan_key(owner: nn.Module, key: str) -> list[tuple[str, nn.Module, str | None]]:
    """Resolve a plan key relative to ``owner``.

    Returns ``(qualified_name, module, None)`` for module targets and
    ``(qualified_name, owning_module, parameter_name)`` for bare-parameter targets.
    Compile wrappers along the path are looked through. A key naming a module this pipeline
    stage does not hold (left ``None`` or removed by the split) resolves to nothing. Raises
    :class:`PlanKeyError` naming the available children when a path segment matches nothing.
    """
    if key == "":
        return [("", owner, None)]
    segments = key.split(".")
    current: list[tuple[str, nn.Module]] = [("", owner)]
    for depth, segment in enumerate(segments):
        is_last = depth == len(segments) - 1
        matched: list[tuple[str, nn.Module, str | None]] = []
        for prefix, module in current:
            module = unwrap_compiled(module)
            for child_name, child in module.named_children():
                if _matches(child_name, segment):
                    matched.append((_join(prefix, child_name), unwrap_compiled(child), None))
            if is_last:
                for param_name, _ in module.named_parameters(recurse=False):
                    if _matches(param_name, segment):
                        matched.append((_join(prefix, param_name), module, param_name))
        if not matched:
            if all(_left_on_another_stage(unwrap_compiled(m), segment) for _, m in current):
                return []
            raise PlanKeyError(_unknown_key_message(owner, key, current, segment, is_last))
        if is_last:
            return matched
        current = [(name, mod) for name, mod, attr in matched if attr is None]
    raise AssertionError("unreachable: the loop returns on the last segment")


def _left_on_another_stage(module: nn.Module, name: str) -> bool:
    # Set by dream_trainer.parallel.pipeline.split_model on what it removes from a stage.
    return (name in module._modules and module._modules[name] is None) or name in getattr(
        module, "pruned_names", ()
    )


def _plan_name(owner: nn.Module) -> str:
    return f"{type(owner).__name__}.{plan_method(owner).__name__}()"


def _matches(name: str, pattern: str) -> bool:
    if _WILDCARD_CHARS.isdisjoint(pattern):
        return name == pattern
    return fnmatchcase(name, pattern)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_message(
    owner: nn.Module,
    key: str,
    searched: list[tuple[str, nn.Module]],
    segment: str,
    is_last: bool,
) -> str:
    children: list[str] = []
    params: list[str] = []
    for prefix, module in searched:
        module = unwrap_compiled(module)
        children += [_join(prefix, n) for n, _ in module.named_children()]
        params += [_join(prefix, n) for n, _ in module.named_parameters(recurse=False)]
    where = ", ".join(repr(p) for p, _ in searched) if searched[0][0] else "the module itself"
    kinds = "submodule or parameter" if is_last else "submodule"
    available = f"available children: {children}"
    if is_last:
        available += f"; bare parameters: {params}"
    return (
        f"{_plan_name(owner)} has the key {key!r}, but no {kinds} of "
        f"{where} matches {segment!r} ({available}). Fix the key to name an existing "
        "submodule or parameter, relative to the module that returns the plan."
    )
