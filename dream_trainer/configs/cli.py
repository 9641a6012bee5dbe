"""Command-line overrides of any config field: ``--device_parameters.tensor_parallel 2``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn ``["--a.b", "2", "--c=x", "--flag"]`` into ``{"a": {"b": 2}, "c": "x", "flag": True}``.

    Values are read as JSON when they parse (numbers, booleans, lists, null), else as strings.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected an option like --field.name VALUE, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("--"):
                raw = "true"
            else:
                raw = nxt
                i += 1
        i += 1
        target = overrides
        *parents, leaf = key.replace("-", "_").split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--{key} sets a field inside {part!r}, which was given a value")
        target[leaf] = _parse_value(raw)
    return overrides


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(config: ConfigT, args: Sequence[str]) -> ConfigT:
    """A copy of ``config`` with command-line overrides applied and validated.

    Unknown fields and bad values raise pydantic's ``ValidationError`` naming the field.
    """
    updates = _canonical(type(config), parse_overrides(args))
    data = _merge(config.model_dump(mode="json"), updates)
    return type(config).model_validate(data)


def _canonical(model: type[BaseModel], updates: dict[str, Any]) -> dict[str, Any]:
    """Translate alias keys (e.g. ``tensor_parallel_size``) at every level before merging, so
    they replace the canonical values of the base config instead of conflicting with them."""
    translate = getattr(model, "translate_aliases", None)
    if translate is not None:
        updates = translate(dict(updates))
    for key, value in list(updates.items()):
        field = model.model_fields.get(key)
        annotation = field.annotation if field is not None else None
        if (
            isinstance(value, dict)
            and isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
        ):
            updates[key] = _canonical(annotation, value)
    return updates
