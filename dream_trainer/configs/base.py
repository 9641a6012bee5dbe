"""The base every Dream Trainer config derives from, and the dtype field type."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().removeprefix("torch.")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(
        f"{value!r} is not a supported floating-point dtype; use one of: "
        "float32, bfloat16, float16, float64 (or a torch.dtype)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DType = Annotated[
    torch.dtype,
    BeforeValidator(parse_dtype),
    PlainSerializer(dtype_name, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["bfloat16", "float32"]}),
]
"""A ``torch.dtype`` field that validates from names and serializes to its name."""


class ConfigModel(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated.

    Subclass it (or any config) and add fields; JSON round-trips exactly through
    ``model_dump_json`` / ``model_validate_json``.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        arbitrary_types_allowed=True,
        use_attribute_docstrings=True,
    )

    @classmethod
    def translate_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rewrite alternative input keys into field names; identity unless a subclass has some."""
        return data

    extra_keys_accepted: ClassVar[frozenset[str]] = frozenset()
    """Keys a subclass translates itself (e.g. guide-form aliases), so they are not typos."""

    shorthands: ClassVar[tuple[str, ...]] = ()
    """The strings :meth:`expand_shorthand` accepts, named in the error for any other string."""

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """The fields a string given in place of this whole config stands for (``None``: it
        stands for nothing). ``DeviceParameters`` expands ``"auto"``; the command line uses this
        too, so ``--device_parameters auto`` keeps the config's other fields."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        expanded = cls.expand_shorthand(data)
        if expanded is None:
            accepted = " or ".join(repr(s) for s in cls.shorthands)
            raise ValueError(
                f"{cls.__name__} cannot be given as the string {data!r}; give its fields as a "
                "dict (or keyword arguments)" + (f", or the string {accepted}" if accepted else "")
            )
        return expanded

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | set(cls.extra_keys_accepted)
        for info in cls.model_fields.values():
            if info.alias:
                known.add(info.alias)
        unknown = [key for key in data if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ValueError(
                f"{cls.__name__} has no field {', '.join(hints)}; "
                f"its fields are: {', '.join(sorted(cls.model_fields))}"
            )
        return data
