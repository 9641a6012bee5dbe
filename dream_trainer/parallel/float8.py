"""torchao float8 training: converting ``nn.Linear`` layers, and detecting ``Float8Linear``.

torchao is an optional dependency (``dream-trainer[fp8]``), imported only inside
:func:`convert_to_float8`, :func:`precompute_float8_scales` and :func:`float8_tp_styles`. A module can only be a
``Float8Linear`` if torchao defined its class, so the class is recognised by name and
defining module, and torchao's tensor-parallel styles are imported only when one is found.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from types import ModuleType
from typing import Any

from torch import nn

from dream_trainer.configs import Float8Config

FLOAT8_TP_MODULE = "torchao.float8.float8_tensor_parallel"
FLOAT8_DIM_MULTIPLE = 16
"""float8 matmul kernels need both dims of a weight to be multiples of this."""
_TP_COMM_ATTRIBUTE = "_dream_trainer_float8_tensor_parallel"


def is_float8_linear(module: object) -> bool:
    """True when ``module`` is (a subclass of) torchao's ``Float8Linear``."""
    return any(
        cls.__name__ == "Float8Linear" and cls.__module__.split(".")[0] == "torchao"
        for cls in type(module).__mro__
    )


def uses_float8_tensor_parallel(module: object) -> bool:
    """True for a ``Float8Linear`` whose tensor-parallel styles should communicate in float8.

    That is torchao's float8 styles: they cast with one scale per tensor, so a rowwise recipe
    gets the plain styles, and so does a module converted with ``float8_tensor_parallel=False``.
    """
    if not is_float8_linear(module) or getattr(module, _TP_COMM_ATTRIBUTE, True) is False:
        return False
    cast = getattr(getattr(module, "config", None), "cast_config_input", None)
    granularity = getattr(cast, "scaling_granularity", None)
    return granularity is None or getattr(granularity, "value", granularity) == "tensorwise"


def feeds_float8_linear(module: nn.Module) -> bool:
    """True when ``module`` or one of its direct children communicates in float8.

    Input preparation for such a module can cast to float8 before the all-gather, so
    the activation is communicated in float8 once for all the float8 consumers.
    """
    return uses_float8_tensor_parallel(module) or any(
        uses_float8_tensor_parallel(c) for c in module.children()
    )


def _import_torchao_float8() -> Any:
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as err:
        raise ImportError(
            f"float8=True trains through torchao.float8, which could not be imported ({err}). "
            "Install the float8 extra with `pip install 'dream-trainer[fp8]'`."
        ) from err


def convert_to_float8(module: nn.Module, config: Float8Config) -> list[str]:
    """Swap ``module``'s ``nn.Linear`` layers for torchao ``Float8Linear`` in place.

    Parameter names do not change. Layers named in ``config.exclude_modules`` stay as they are;
    any other Linear must have both dims a multiple of 16 (the float8 kernels' tile) and must
    not share its weight when the float8 all-gather is on. Works on the meta device, before
    tensor parallelism and FSDP. Returns the converted names.
    """
    linears = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear and name] + (
        [("", module)] if type(module) is nn.Linear else []
    )
    chosen = [
        (name, m)
        for name, m in linears
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude_modules)
    ]
    if not chosen:
        raise ValueError(
            f"float8=True found no nn.Linear to convert in {type(module).__name__} "
            f"({len(linears)} Linear layers, all matched by float8_config.exclude_modules="
            f"{config.exclude_modules}); drop the exclusions or set float8=False"
        )
    for name, linear in chosen:
        if linear.in_features % FLOAT8_DIM_MULTIPLE or linear.out_features % FLOAT8_DIM_MULTIPLE:
            raise ValueError(
                f"float8 cannot convert {name or type(module).__name__!r}: its weight is "
                f"{linear.out_features} x {linear.in_features}, and float8 matmuls need both "
                f"dims to be multiples of {FLOAT8_DIM_MULTIPLE}; add it to "
                "float8_config.exclude_modules or resize it"
            )
    if config.enable_fsdp_float8_all_gather:
        _refuse_shared_weights(module, chosen)
    float8 = _import_torchao_float8()
    recipe = float8.Float8LinearConfig.from_recipe_name(config.recipe)
    options = dataclasses.replace(
        recipe,
        emulate=config.emulate,
        enable_fsdp_float8_all_gather=config.enable_fsdp_float8_all_gather,
    )
    names = {id(m): name for name, m in chosen}
    float8.convert_to_float8_training(
        module, config=options, module_filter_fn=lambda m, _fqn: id(m) in names
    )
    tp_comm = config.uses_float8_tensor_parallel()
    converted = []
    for name, sub in module.named_modules():
        if is_float8_linear(sub):
            setattr(sub, _TP_COMM_ATTRIBUTE, tp_comm)
            converted.append(name)
    return converted


def check_float8_layout(config: Float8Config, fsdp_enabled: bool, tp_backend: str | None) -> None:
    """Refuse float8 options the layout cannot honour (before anything is converted).

    ``tp_backend``: the process-group backend of the tensor-parallel mesh, ``None`` without TP.
    """
    if config.enable_fsdp_float8_all_gather and not fsdp_enabled:
        raise ValueError(
            "float8_config.enable_fsdp_float8_all_gather=True, but this layout runs no FSDP "
            "(dp_shard x context_parallel is 1), so there is no weight all-gather to cast; "
            "turn it off or shard over dp_shard > 1"
        )
    if tp_backend == "gloo" and config.uses_float8_tensor_parallel():
        raise ValueError(
            "float8 under tensor parallelism casts activations to float8 before the TP "
            "all-gathers, which gloo cannot do; set float8_config.float8_tensor_parallel=False "
            "to communicate them in the compute dtype"
        )


def precompute_float8_scales(module: nn.Module) -> None:
    """Compute the float8 all-gather scales of every weight in ``module`` with one all-reduce.

    Run after each optimizer step (every rank of the FSDP mesh) when
    ``float8_config.precompute_fsdp_scales`` is on; FSDP's next all-gathers use them.
    """
    _import_torchao_float8().precompute_float8_dynamic_scale_for_fsdp(module)


def _refuse_shared_weights(module: nn.Module, chosen: list[tuple[str, nn.Linear]]) -> None:
    owners: dict[int, list[str]] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        for pname, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for name, linear in chosen:
        shared = [n for n in owners.get(id(linear.weight), []) if n != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"float8_config.enable_fsdp_float8_all_gather wraps {name!r}'s weight in a "
                f"float8 tensor, which would untie it from {', '.join(shared)}; add {name!r} "
                "to float8_config.exclude_modules or turn the float8 all-gather off"
            )


def float8_tp_styles() -> ModuleType:
    """Import torchao's float8 tensor-parallel styles, naming the extra when it is missing."""
    try:
        return importlib.import_module(FLOAT8_TP_MODULE)
    except ImportError as err:
        raise ImportError(
            f"The plan targets a torchao Float8Linear, so the float8 tensor-parallel styles "
            f"from '{FLOAT8_TP_MODULE}' are needed, but they could not be imported ({err}). "
            "Install the float8 extra with `pip install 'dream-trainer[fp8]'`."
        ) from err
