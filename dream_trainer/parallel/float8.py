"""Detection of torchao ``Float8Linear`` modules without importing torchao.

torchao is an optional dependency (``dream-trainer[fp8]``). A module can only be a
``Float8Linear`` if torchao defined its class, so the class is recognised by name and
defining module, and torchao's tensor-parallel styles are imported only when one is found.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

FLOAT8_TP_MODULE = "torchao.float8.float8_tensor_parallel"


def is_float8_linear(module: object) -> bool:
    """True when ``module`` is (a subclass of) torchao's ``Float8Linear``."""
    return any(
        cls.__name__ == "Float8Linear" and cls.__module__.split(".")[0] == "torchao"
        for cls in type(module).__mro__
    )


def feeds_float8_linear(module: nn.Module) -> bool:
    """True when ``module`` or one of its direct children is a ``Float8Linear``.

    Input preparation for such a module can cast to float8 before the all-gather, so
    the activation is communicated in float8 once for all the float8 consumers.
    """
    return is_float8_linear(module) or any(is_float8_linear(c) for c in module.children())


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
