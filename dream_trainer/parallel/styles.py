"""Style helpers: declarative constructors for torch tensor-parallel styles.

Each helper returns a *constructor*: a callable that receives the module (or bare
parameter) a plan entry targets and returns the style to apply to it. Deferring the
choice until the target is known lets a plan pick torchao's float8 styles for
``Float8Linear`` modules without the model author writing two plans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import style as torch_styles
from torch.distributed.tensor.parallel.style import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from dream_trainer.parallel.float8 import (
    feeds_float8_linear,
    float8_tp_styles,
    uses_float8_tensor_parallel,
)

__all__ = [
    "ParameterStyle",
    "PlanTarget",
    "StyleConstructor",
    "colwise_parallel",
    "parameter_parallel",
    "prepare_module",
    "prepare_module_input",
    "prepare_module_output",
    "rowwise_parallel",
    "sequence_parallel",
]

Layouts = Placement | tuple[Placement | None, ...] | None

# Not every supported torch release is guaranteed to ship it; `prepare_module` composes
# PrepareModuleInput and PrepareModuleOutput itself when it is absent.
_PrepareModuleInputOutput: Any = getattr(torch_styles, "PrepareModuleInputOutput", None)


@dataclass(frozen=True)
class ParameterStyle:
    """Distributes a bare ``nn.Parameter`` with fixed DTensor placements (one per mesh dim)."""

    placements: tuple[Placement, ...]

    def __call__(self, target: PlanTarget) -> ParameterStyle:
        if not isinstance(target, nn.Parameter):
            raise TypeError(
                f"parameter_parallel({list(self.placements)}) targets bare nn.Parameter "
                f"attributes, but the plan entry points at a {type(target).__name__} module; "
                "use a module style such as colwise_parallel() for modules."
            )
        return self

    def distribute(self, param: nn.Parameter, mesh: DeviceMesh) -> nn.Parameter:
        """Return a new ``nn.Parameter`` wrapping ``param`` distributed over ``mesh``."""
        if isinstance(param.data, DTensor):
            raise ValueError(
                f"parameter_parallel({list(self.placements)}) was asked to distribute a "
                f"parameter that is already a DTensor with placements {param.data.placements}; "
                "remove the duplicate plan entry."
            )
        if len(self.placements) != mesh.ndim:
            raise ValueError(
                f"parameter_parallel got {len(self.placements)} placements "
                f"{list(self.placements)} for a {mesh.ndim}-D mesh; pass one placement per "
                "mesh dimension."
            )
        with torch.no_grad():
            dtensor = distribute_tensor(param.detach(), mesh, list(self.placements))
        return nn.Parameter(dtensor, requires_grad=param.requires_grad)


PlanTarget = nn.Module | nn.Parameter
StyleConstructor = Callable[[PlanTarget], ParallelStyle | ParameterStyle]


class _ModuleStyleConstructor:
    """A named, inspectable constructor that builds a style for a target module."""

    def __init__(
        self, name: str, build: Callable[[nn.Module], ParallelStyle], kwargs: dict[str, Any]
    ) -> None:
        self.name = name
        self.kwargs = kwargs
        self._build = build

    def __call__(self, target: PlanTarget) -> ParallelStyle:
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"{self.name}() builds a style for a module, but the plan entry points at a "
                f"{type(target).__name__}; use parameter_parallel(placements) for bare "
                "parameters."
            )
        return self._build(target)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


class _ComposedStyle(ParallelStyle):
    """Applies several styles to the same module, in order."""

    def __init__(self, *styles: ParallelStyle) -> None:
        self.styles = styles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            style.src_data_rank = self.src_data_rank
            module = style._apply(module, device_mesh)
        return module

    def __repr__(self) -> str:
        return f"_ComposedStyle{self.styles!r}"


def colwise_parallel(
    module: nn.Module | None = None,
    /,
    *,
    input_layouts: Placement | None = None,
    output_layouts: Placement | None = None,
    use_local_output: bool = True,
) -> StyleConstructor:
    """Shard a Linear/Embedding column-wise (weight ``Shard(0)``); float8-aware.

    ``module``, the plan's target, may be passed first as fsdp2-utils does; the style is
    chosen from the target the plan entry resolves to either way.
    """
    _check_module_argument("colwise_parallel", module)
    kwargs: dict[str, Any] = dict(
        input_layouts=input_layouts,
        output_layouts=output_layouts,
        use_local_output=use_local_output,
    )

    def build(module: nn.Module) -> ParallelStyle:
        if uses_float8_tensor_parallel(module):
            return float8_tp_styles().Float8ColwiseParallel(**kwargs)
        return ColwiseParallel(**kwargs)

    return _ModuleStyleConstructor("colwise_parallel", build, kwargs)


def rowwise_parallel(
    module: nn.Module | None = None,
    /,
    *,
    input_layouts: Placement | None = None,
    output_layouts: Placement | None = None,
    use_local_output: bool = True,
) -> StyleConstructor:
    """Shard a Linear row-wise (weight ``Shard(1)``) or an Embedding on vocab; float8-aware."""
    _check_module_argument("rowwise_parallel", module)
    kwargs: dict[str, Any] = dict(
        input_layouts=input_layouts,
        output_layouts=output_layouts,
        use_local_output=use_local_output,
    )

    def build(module: nn.Module) -> ParallelStyle:
        if uses_float8_tensor_parallel(module):
            return float8_tp_styles().Float8RowwiseParallel(**kwargs)
        return RowwiseParallel(**kwargs)

    return _ModuleStyleConstructor("rowwise_parallel", build, kwargs)


def sequence_parallel(
    module: nn.Module | None = None,
    /,
    *,
    sequence_dim: int = 1,
    input_layouts: Layouts = None,
    output_layouts: Layouts = None,
    use_local_output: bool = False,
) -> StyleConstructor:
    """Run a norm/dropout on sequence shards with replicated parameters.

    The input is taken as sharded on ``sequence_dim`` unless ``input_layouts`` says how it
    arrives (it is then redistributed to the sequence shards); ``output_layouts``
    redistributes the output afterwards.
    """
    _check_module_argument("sequence_parallel", module)
    kwargs: dict[str, Any] = dict(
        sequence_dim=sequence_dim,
        input_layouts=input_layouts,
        output_layouts=output_layouts,
        use_local_output=use_local_output,
    )
    sharded = Shard(sequence_dim)

    def build(module: nn.Module) -> ParallelStyle:
        if input_layouts is None and output_layouts is None:
            return SequenceParallel(sequence_dim=sequence_dim, use_local_output=use_local_output)
        styles: list[ParallelStyle] = []
        if input_layouts is not None:
            styles.append(
                PrepareModuleInput(
                    input_layouts=input_layouts,
                    desired_input_layouts=_like(input_layouts, sharded),
                    use_local_output=False,
                )
            )
        styles.append(SequenceParallel(sequence_dim=sequence_dim, use_local_output=False))
        if output_layouts is not None:
            styles.append(
                PrepareModuleOutput(
                    output_layouts=_like(output_layouts, sharded),  # type: ignore[arg-type]
                    desired_output_layouts=output_layouts,  # type: ignore[arg-type]
                    use_local_output=use_local_output,
                )
            )
        return _ComposedStyle(*styles)

    return _ModuleStyleConstructor("sequence_parallel", build, kwargs)


def prepare_module_input(
    module: nn.Module | None = None,
    /,
    *,
    input_layouts: Layouts = None,
    desired_input_layouts: Layouts = None,
    input_kwarg_layouts: dict[str, Placement] | None = None,
    desired_input_kwarg_layouts: dict[str, Placement] | None = None,
    use_local_output: bool = False,
) -> StyleConstructor:
    """Redistribute a module's inputs; casts to float8 first if it feeds a Float8Linear."""
    _check_module_argument("prepare_module_input", module)
    kwargs: dict[str, Any] = dict(
        input_layouts=input_layouts,
        desired_input_layouts=desired_input_layouts,
        input_kwarg_layouts=input_kwarg_layouts,
        desired_input_kwarg_layouts=desired_input_kwarg_layouts,
        use_local_output=use_local_output,
    )
    return _ModuleStyleConstructor(
        "prepare_module_input", lambda module: _input_style(module, kwargs), kwargs
    )


def prepare_module_output(
    module: nn.Module | None = None,
    /,
    *,
    output_layouts: Layouts,
    desired_output_layouts: Layouts,
    use_local_output: bool = True,
) -> StyleConstructor:
    """Redistribute a module's outputs from ``output_layouts`` to ``desired_output_layouts``."""
    _check_module_argument("prepare_module_output", module)
    kwargs: dict[str, Any] = dict(
        output_layouts=output_layouts,
        desired_output_layouts=desired_output_layouts,
        use_local_output=use_local_output,
    )

    def build(module: nn.Module) -> ParallelStyle:
        return PrepareModuleOutput(**kwargs)

    return _ModuleStyleConstructor("prepare_module_output", build, kwargs)


def prepare_module(
    module: nn.Module | None = None,
    /,
    *,
    input_layouts: Layouts = None,
    desired_input_layouts: Layouts = None,
    input_kwarg_layouts: dict[str, Placement] | None = None,
    desired_input_kwarg_layouts: dict[str, Placement] | None = None,
    use_local_input: bool | None = None,
    output_layouts: Layouts = None,
    desired_output_layouts: Layouts = None,
    use_local_output: bool | None = None,
    use_local_output_for_input: bool | None = None,
    use_local_output_for_output: bool | None = None,
) -> StyleConstructor:
    """Redistribute both the inputs and the outputs of a module (PrepareModuleInputOutput).

    ``use_local_input`` (default False) and ``use_local_output`` (default True) may also be
    spelled ``use_local_output_for_input`` / ``use_local_output_for_output``, as in fsdp2-utils.
    """
    _check_module_argument("prepare_module", module)
    use_local_input = _one_of(
        "use_local_input", use_local_input, "use_local_output_for_input", use_local_output_for_input
    )
    use_local_output = _one_of(
        "use_local_output",
        use_local_output,
        "use_local_output_for_output",
        use_local_output_for_output,
    )
    use_local_input = False if use_local_input is None else use_local_input
    use_local_output = True if use_local_output is None else use_local_output
    if output_layouts is None or desired_output_layouts is None:
        raise ValueError(
            "prepare_module needs both output_layouts and desired_output_layouts, got "
            f"output_layouts={output_layouts!r} and desired_output_layouts="
            f"{desired_output_layouts!r}; pass both, or use prepare_module_input() to "
            "prepare only the inputs."
        )
    kwargs: dict[str, Any] = dict(
        input_layouts=input_layouts,
        desired_input_layouts=desired_input_layouts,
        input_kwarg_layouts=input_kwarg_layouts,
        desired_input_kwarg_layouts=desired_input_kwarg_layouts,
        use_local_input=use_local_input,
        output_layouts=output_layouts,
        desired_output_layouts=desired_output_layouts,
        use_local_output=use_local_output,
    )
    output_names = ("output_layouts", "desired_output_layouts", "use_local_output")
    output_kwargs = {k: kwargs[k] for k in output_names}
    input_kwargs = {k: v for k, v in kwargs.items() if k not in output_names}
    input_kwargs["use_local_output"] = input_kwargs.pop("use_local_input")

    def build(module: nn.Module) -> ParallelStyle:
        if _PrepareModuleInputOutput is not None and not feeds_float8_linear(module):
            return _PrepareModuleInputOutput(**kwargs)
        return _ComposedStyle(
            _input_style(module, input_kwargs), PrepareModuleOutput(**output_kwargs)
        )

    return _ModuleStyleConstructor("prepare_module", build, kwargs)


def parameter_parallel(
    placements: Sequence[Placement] | Placement | None = None,
) -> ParameterStyle:
    """Distribute a bare ``nn.Parameter`` attribute with ``placements`` (one per mesh dim).

    Without placements the parameter is replicated (``Replicate()``), as in fsdp2-utils.
    """
    if placements is None:
        placements = Replicate()
    if isinstance(placements, Placement):
        placements = (placements,)
    placements = tuple(placements)
    bad = [p for p in placements if not isinstance(p, Placement)]
    if not placements or bad:
        raise TypeError(
            f"parameter_parallel expects a non-empty sequence of DTensor placements such as "
            f"[Shard(0)], got {placements!r}."
        )
    return ParameterStyle(placements)


def _check_module_argument(helper: str, module: object) -> None:
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(
            f"{helper}() takes the module it targets as its only positional argument (as in "
            f"{helper}(self.attention.wq)), got a {type(module).__name__}; pass layouts as "
            "keywords, e.g. input_layouts=Shard(1)"
        )


def _one_of(name: str, value: bool | None, alias: str, alias_value: bool | None) -> bool | None:
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"prepare_module got {name}={value} and {alias}={alias_value}; they are the same "
            "option, so pass only one of them"
        )
    return value if value is not None else alias_value


def _like(layouts: Layouts, placement: Placement) -> Layouts:
    """``placement`` in the shape of ``layouts`` (one entry per input/output, None kept)."""
    if isinstance(layouts, tuple):
        return tuple(None if p is None else placement for p in layouts)
    return placement


def _input_style(module: nn.Module, kwargs: dict[str, Any]) -> ParallelStyle:
    if feeds_float8_linear(module):
        return float8_tp_styles().PrepareFloat8ModuleInput(**kwargs)
    return PrepareModuleInput(**kwargs)
