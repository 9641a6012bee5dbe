"""Changing the collective timeout of process groups that already exist.

torch has no public API for it. Each backend object behind a group (``group._get_backend(device)``)
has ``_set_default_timeout`` (gloo, NCCL; torch 2.11 to 2.13 at least) or ``set_timeout`` (the
``Backend`` base, newer builds); ``distributed_c10d._set_pg_timeout`` wraps the first and
``ProcessGroup.set_timeout`` sets every backend of a group. They are tried in that order, and a
group whose timeout cannot be changed (or read back as changed) is an error: a run must not
silently keep the long setup timeout on a group its training collectives use.
"""

from __future__ import annotations

import datetime
import warnings
from typing import Any

import torch
import torch.distributed as dist

__all__: list[str] = []  # internals of DistributedWorld

# Backends whose collectives return at once without communicating: no timeout to set.
_NO_TIMEOUT_BACKENDS = ("fake",)


def group_label(group: Any) -> str:
    """``name (desc)`` of a process group, as torch registered it (``"0 (default_pg)"``)."""
    name = getattr(group, "group_name", "?")
    desc = getattr(group, "group_desc", "")
    return f"{name} ({desc})" if desc and desc != "undefined" else str(name)


def _backend_name(group: Any) -> str:
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):
        return "unknown"


def _backends_of(group: Any) -> list[Any]:
    """The backend objects behind ``group``, one per device type it serves (no duplicates)."""
    devices = list(getattr(group, "_device_types", None) or [torch.device("cpu")])
    found: list[Any] = []
    for device in devices:
        try:
            backend = group._get_backend(device)
        except (RuntimeError, AttributeError):  # no backend registered for this device type
            continue
        if all(backend is not other for other in found):
            found.append(backend)
    return found


def group_timeouts(group: Any) -> list[datetime.timedelta]:
    """The timeouts ``group``'s backends use for new collectives now; empty if unreadable."""
    timeouts = []
    for backend in _backends_of(group):
        timeout = getattr(getattr(backend, "options", None), "_timeout", None)
        if isinstance(timeout, datetime.timedelta):
            timeouts.append(timeout)
    return timeouts


def _set_on_backends(group: Any, timeout: datetime.timedelta) -> bool:
    changed = False
    for backend in _backends_of(group):
        setter = getattr(backend, "_set_default_timeout", None) or getattr(
            backend, "set_timeout", None
        )
        if setter is not None:
            setter(timeout)
            changed = True
    return changed


def _set_with_c10d_helper(group: Any, timeout: datetime.timedelta) -> bool:
    helper = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if helper is None:
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        helper(timeout, group)
    # It warns ("only supported for either nccl or gloo") when it found no backend to set.
    return not caught


def _set_on_group(group: Any, timeout: datetime.timedelta) -> bool:
    setter = getattr(group, "set_timeout", None)
    if setter is None:
        return False
    setter(timeout)
    return True


def set_group_timeout(group: Any, timeout: datetime.timedelta) -> bool:
    """Make ``group``'s future collectives time out after ``timeout``.

    Returns False for a backend without timeouts (torch's ``fake`` group); raises RuntimeError
    when no method this torch offers changed the timeout, or the group reads back another one.
    """
    backend = _backend_name(group)
    if backend in _NO_TIMEOUT_BACKENDS:
        return False
    errors: list[str] = []
    changed = False
    for method in (_set_on_backends, _set_with_c10d_helper, _set_on_group):
        try:
            changed = method(group, timeout)
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. "not implemented"
            errors.append(f"{method.__name__.lstrip('_')}: {error}")
            continue
        if changed:
            break
    wrong = [t for t in group_timeouts(group) if t != timeout]
    if changed and not wrong:
        return True
    found = f"; it reads back {sorted(set(wrong))}" if wrong else ""
    tried = f" ({'; '.join(errors)})" if errors else ""
    raise RuntimeError(
        f"cannot set the collective timeout of process group {group_label(group)} (backend "
        f"{backend}) to {timeout.total_seconds():g} s with torch {torch.__version__}{tried}"
        f"{found}. Its collectives would keep the timeout they were created with (torch's "
        "default for a new group is 30 min), so a hang would be noticed that late; use a torch "
        "build whose backends support set_timeout, or report this version."
    )
