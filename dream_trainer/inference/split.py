"""How N items are cut into contiguous, as-even-as-possible shares."""

from __future__ import annotations


def even_split(n_items: int, n_parts: int) -> list[range]:
    """``n_parts`` contiguous ranges covering ``range(n_items)``; sizes differ by at most one.

    The first ``n_items % n_parts`` parts get one item more: 33 items on 4 parts are
    ``range(0, 9), range(9, 17), range(17, 25), range(25, 33)``. Parts may be empty.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be 0 or more, got {n_items}")
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    base, extra = divmod(n_items, n_parts)
    parts, start = [], 0
    for index in range(n_parts):
        size = base + (1 if index < extra else 0)
        parts.append(range(start, start + size))
        start += size
    return parts


def split_indices(indices: list[int], n_parts: int) -> list[list[int]]:
    """:func:`even_split` applied to a list of item indices (kept in their order)."""
    return [[indices[i] for i in part] for part in even_split(len(indices), n_parts)]


def batches_of(indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
