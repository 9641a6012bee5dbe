"""Apply tensor parallelism through the :class:`~dream_trainer.parallel.ParallelPlan` protocol."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from dream_trainer.parallel.fully_shard import post_order
from dream_trainer.parallel.protocols import has_parallel_plan, unwrap_compiled
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
    """Apply every ``parallelize_plan`` in the tree to ``tp_mesh``, children before parents.

    Module entries are applied with torch's ``parallelize_module``; bare-parameter entries
    (``parameter_parallel``) replace the parameter with an ``nn.Parameter(DTensor)``.
    ``loss_parallel`` is passed to each plan so the output projection can keep its logits
    sharded on the vocabulary dimension. Returns ``module`` (the same object).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tensor_parallel needs a 1-D tensor-parallel mesh, got a {tp_mesh.ndim}-D "
            f"mesh with dims {tp_mesh.mesh_dim_names}; pass the tp slice, e.g. mesh['tp']."
        )
    for owner in list(post_order(module)):
        if has_parallel_plan(owner):
            _apply_plan(owner, _get_plan(owner, loss_parallel), tp_mesh)
    return module


def _get_plan(owner: nn.Module, loss_parallel: bool) -> dict[str, Any]:
    plan = owner.parallelize_plan(loss_parallel)  # type: ignore[operator]
    name = type(owner).__name__
    if not isinstance(plan, dict):
        raise TypeError(
            f"{name}.parallelize_plan(loss_parallel={loss_parallel}) returned a "
            f"{type(plan).__name__}, but a plan must be a dict mapping submodule or parameter "
            "names to style constructors, e.g. {'wq': colwise_parallel()}; return a dict "
            "(an empty dict for no tensor parallelism)."
        )
    for key, value in plan.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{name}.parallelize_plan() has the key {key!r} of type {type(key).__name__}; "
                "plan keys must be strings naming a submodule or parameter ('' for the module)."
            )
        if not (isinstance(value, ParallelStyle) or callable(value)):
            raise TypeError(
                f"{name}.parallelize_plan() maps {key!r} to a {type(value).__name__}; values "
                "must be style constructors such as colwise_parallel() or parameter_parallel()."
            )
    return plan


def _apply_plan(owner: nn.Module, plan: dict[str, Any], tp_mesh: DeviceMesh) -> None:
    # Resolve every key first so a typo fails before the model is partly parallelized.
    resolved = [
        (key, constructor, resolve_plan_key(owner, key)) for key, constructor in plan.items()
    ]
    for key, constructor, targets in resolved:
        for qualified_name, parent, attr in targets:
            target: nn.Module | nn.Parameter = (
                parent if attr is None else parent._parameters[attr]  # type: ignore[assignment]
            )
            style = constructor if isinstance(constructor, ParallelStyle) else constructor(target)
            where = (
                f"{type(owner).__name__}.parallelize_plan()[{key!r}] (target {qualified_name!r})"
            )
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
    Compile wrappers along the path are looked through. Raises :class:`PlanKeyError` naming the
    available children when a path segment matches nothing.
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
            raise PlanKeyError(_unknown_key_message(owner, key, current, segment, is_last))
        if is_last:
            return matched
        current = [(name, mod) for name, mod, attr in matched if attr is None]
    raise AssertionError("unreachable: the loop returns on the last segment")


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
        f"{type(owner).__name__}.parallelize_plan() has the key {key!r}, but no {kinds} of "
        f"{where} matches {segment!r} ({available}). Fix the key to name an existing "
        "submodule or parameter, relative to the module that returns the plan."
    )
