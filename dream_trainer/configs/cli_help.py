"""``--help`` for config-driven scripts: every field with its type, current value and docs."""

from __future__ import annotations

import enum
import json
import textwrap
import types
import typing
from typing import Any

import torch
from pydantic import BaseModel

_NAMES = {int: "int", float: "float", str: "str", bool: "bool", type(None): "null"}


def describe_type(annotation: Any) -> str:
    """A short human name for a field type: ``int``, ``int | null``, ``'auto' | int``, ..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner = typing.get_args(annotation)[0]
        return "dtype" if inner is torch.dtype else describe_type(inner)
    if origin is typing.Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return f"list[{describe_type(args[0])}]" if args else "list"
    if origin is dict:
        return "dict"
    if annotation is torch.dtype:
        return "dtype"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in annotation)
    if annotation in _NAMES:
        return _NAMES[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "{...}"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _rows(config: BaseModel, prefix: str) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        key = f"{prefix}{name}"
        doc = " ".join((field.description or "").split())
        if isinstance(value, BaseModel):
            aliases = sorted(getattr(type(value), "extra_keys_accepted", ()))
            if aliases:
                doc = (doc + " " if doc else "") + f"Also accepts: {', '.join(aliases)}."
            rows.append((key, "", "", doc))
            rows.extend(_rows(value, f"{key}."))
            continue
        rows.append((key, describe_type(field.annotation), _shown(value), doc))
    return rows


def help_text(config: BaseModel, *, program: str, usage: str = "", width: int = 100) -> str:
    """Every field of ``config`` as ``--dotted.name TYPE (default: VALUE)`` with its docstring."""
    lines = [f"usage: {program} {usage}[--field.name VALUE ...]".replace("  ", " ")]
    lines.append("")
    lines.append(
        f"Every field of {type(config).__name__} can be set as --dotted.name VALUE (values are "
        "JSON: 2, 1e-3, true, null, [1, 2], or plain text); a boolean field alone means true."
    )
    for key, kind, value, doc in _rows(config, ""):
        lines.append("")
        if not kind:
            lines.append(f"{key}:")
        else:
            lines.append(f"  --{key} {kind.upper() if kind in _NAMES.values() else kind}")
            lines.append(f"      default: {value}")
        if doc:
            indent = "      " if kind else "  "
            lines.extend(textwrap.wrap(doc, width, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(lines)
