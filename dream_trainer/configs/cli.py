"""Command-line overrides of any config field: ``--device_parameters.tensor_parallel 2``.

Kept in-house rather than built on pydantic-settings: overrides apply on top of a config
*instance* (a named preset), the guide's alias keys (``tensor_parallel_size``) are translated at
every nesting level, nothing is read from environment variables, and the help lists the
preset's values, not the class defaults.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class OverrideError(ValueError):
    """A command-line option is malformed, has no value, or has the wrong kind of value."""


def parse_overrides(args: Sequence[str], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Turn ``["--a.b", "2", "--c=x", "--flag"]`` into ``{"a": {"b": 2}, "c": "x", "flag": True}``.

    Values are read as JSON when they parse (numbers, booleans, lists, null), else as strings.
    With ``model``, an option without a value is accepted only for a boolean field (it means
    ``true``), and a boolean value for a field that takes no boolean is an error; without it,
    every option without a value means ``true``.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise OverrideError(f"expected an option like --field.name VALUE, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        key = key.replace("-", "_")
        annotation = _annotation_at(model, key) if model is not None else _UNKNOWN
        has_value = bool(eq) or (i + 1 < len(args) and not args[i + 1].startswith("--"))
        if eq:
            value = _parse_value(raw)
        elif has_value:
            value = _parse_value(args[i + 1])
            i += 1
        elif model is None or _admits_bool(annotation):
            value = True
        else:
            raise OverrideError(
                f"--{key} needs a value of type {_describe(annotation)}, but none was given; "
                f"write --{key} VALUE"
            )
        if model is not None and isinstance(value, bool) and not _admits_bool(annotation):
            raise OverrideError(
                f"--{key} {str(value).lower()}: {key} is of type {_describe(annotation)}, so it "
                "cannot be a boolean; give it a value of that type"
            )
        i += 1
        target = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise OverrideError(
                    f"--{key} sets a field inside {part!r}, which was given a value"
                )
        expanded = _expand_shorthand(annotation, value)
        if expanded is not None:  # --device_parameters auto: merged, so other options stay
            earlier = target.get(leaf)
            value = _merge(earlier, expanded) if isinstance(earlier, dict) else expanded
        target[leaf] = value
    return overrides


def _expand_shorthand(annotation: Any, value: Any) -> dict[str, Any] | None:
    """The fields a string given for a whole config stands for (``"auto"`` for
    ``DeviceParameters``), or ``None``."""
    sub = _model_class(annotation) if annotation is not _UNKNOWN else None
    expand = getattr(sub, "expand_shorthand", None)
    if not isinstance(value, str) or expand is None:
        return None
    expanded = expand(value)
    return dict(expanded) if expanded is not None else None


def apply_overrides(config: ConfigT, args: Sequence[str]) -> ConfigT:
    """A copy of ``config`` with command-line overrides applied and validated.

    Malformed options raise :class:`OverrideError`; unknown fields and bad values raise
    pydantic's ``ValidationError`` naming the field.
    """
    updates = _canonical(type(config), parse_overrides(args, type(config)))
    data = _merge(config.model_dump(mode="json"), updates)
    return type(config).model_validate(data)


def config_from_command_line(
    config: ConfigT, args: Sequence[str], *, program: str | None = None, usage: str = ""
) -> ConfigT:
    """:func:`apply_overrides` for a script's ``main``: ``--help`` prints every field and exits 0;
    a bad option prints one error naming it and exits 2 (no traceback)."""
    from dream_trainer.configs.cli_help import help_text

    program = program or sys.argv[0]
    if "--help" in args or "-h" in args:
        print(help_text(config, program=program, usage=usage))
        raise SystemExit(0)
    try:
        return apply_overrides(config, args)
    except (OverrideError, ValidationError) as error:
        print(
            f"{program}: error: {_one_line(error)}\n(run with --help for every field)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors(include_url=False):
            where = ".".join(str(p) for p in item["loc"])
            message = str(item["msg"]).removeprefix("Value error, ")
            if item.get("type") != "value_error" and not isinstance(item.get("input"), dict):
                message += f" (got {item.get('input')!r})"
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return str(error)


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


def _canonical(model: type[BaseModel], updates: dict[str, Any]) -> dict[str, Any]:
    """Translate alias keys (e.g. ``tensor_parallel_size``) at every level before merging, so
    they replace the canonical values of the base config instead of conflicting with them."""
    translate = getattr(model, "translate_aliases", None)
    if translate is not None:
        updates = translate(dict(updates))
    for key, value in list(updates.items()):
        field = model.model_fields.get(key)
        sub = _model_class(field.annotation) if field is not None else None
        if isinstance(value, dict) and sub is not None:
            updates[key] = _canonical(sub, value)
    return updates


# ------------------------------------------------------------------- field types by path

_UNKNOWN: Any = object()


def _model_class(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *_union_members(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return ()


def _annotation_at(model: type[BaseModel], dotted: str) -> Any:
    """The annotation of the field at ``dotted`` (``_UNKNOWN`` for free-form or missing keys)."""
    current: type[BaseModel] | None = model
    annotation: Any = _UNKNOWN
    for part in dotted.split("."):
        if current is None:
            return _UNKNOWN
        field = current.model_fields.get(part)
        if field is None:
            return _UNKNOWN  # an alias or a typo: validation names it
        annotation = field.annotation
        current = _model_class(annotation)
    return annotation


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _admits_bool(annotation: Any) -> bool:
    if annotation is _UNKNOWN or annotation is Any:
        return True
    annotation = _strip_annotated(annotation)
    if annotation is bool:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(v, bool) for v in typing.get_args(annotation))
    return any(_admits_bool(m) for m in _union_members(annotation) if m is not type(None))


def _describe(annotation: Any) -> str:
    from dream_trainer.configs.cli_help import describe_type

    if annotation is _UNKNOWN:
        return "any"
    return describe_type(annotation)
