"""Initialization that gives the same values under every layout, generating only local shards.

A tensor is filled in blocks of whole rows (slices along dim 0). Each block's values come from
its own generator, seeded from ``(seed, key, block index)``, so a value depends only on the
tensor's global shape, the seed, the key (usually the parameter's name) and its position, never
on how the tensor is split. For a DTensor a rank builds only the blocks that intersect its
local piece and copies the rows it holds (and, when dims other than 0 are sharded, only its
columns) into place: memory beyond the shard is one block, and the work is the local rows at
full width. A plain tensor is filled the same way, block by block, so an unsharded
initialization (``weight_init="full"``) and a sharded one give bitwise identical weights.

Values are generated in float32, by default on the CPU, then cast and copied to the tensor's
device and dtype: CPU and CUDA generators produce different streams, so generating on the CPU
keeps the weights the same on every device type (at the CPU's speed; see ``generator_device``).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Placement, Replicate, distribute_tensor

__all__ = ["BLOCK_ELEMENTS", "Fill", "block_seed", "fill_blockwise_"]

BLOCK_ELEMENTS = 1 << 16
"""Target size of one generated block (65,536 values, 256 KiB in float32): a block holds
``max(1, BLOCK_ELEMENTS // row_size)`` rows. Small enough that a rank wastes little work on the
rows of a block it does not hold; large enough that a 70B model's shard on each of 64 ranks
takes some 20,000 generator calls rather than millions."""

_DISTRIBUTE_TAKES_SRC_RANK = "src_data_rank" in inspect.signature(distribute_tensor).parameters

Fill = Callable[[torch.Tensor, torch.Generator], object]
"""Fills a float32 block (on the generator's device) in place from the generator, e.g.
``lambda t, g: t.normal_(0.0, 0.02, generator=g)``."""


def block_seed(seed: int, key: str, block: int) -> int:
    """The generator seed of block ``block`` of the tensor named ``key`` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{key}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def fill_blockwise_(
    tensor: torch.Tensor,
    fill: Fill,
    *,
    seed: int,
    key: str,
    block_elements: int = BLOCK_ELEMENTS,
    generator_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fill ``tensor`` (plain or DTensor, any placements) so its values do not depend on the layout.

    ``fill(block, generator)`` must fill ``block``, a float32 tensor of whole rows of the full
    tensor, in place and elementwise (``normal_``, ``uniform_``, ``trunc_normal_``): it sees a
    block, not the whole tensor, so a standard deviation that depends on the shape must be
    computed from the full shape by the caller. ``generator_device``: where values are drawn;
    the CPU gives the same values on every machine, a GPU is much faster but its values differ
    from the CPU's (and may differ between GPU models). Returns ``tensor``.
    """
    if block_elements < 1:
        raise ValueError(f"block_elements must be a positive count, got {block_elements}")
    shape = tuple(tensor.shape)
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        indices = _local_indices(tensor, key)
    else:
        local, indices = tensor, [None] * len(shape)
    if not shape:  # a 0-d tensor is one row of one value
        shape, local, indices = (1,), local.view(1), [None]
    if local.numel() == 0:
        return tensor
    rows = indices[0] if indices[0] is not None else torch.arange(shape[0])
    columns = [(dim, index) for dim, index in enumerate(indices) if dim and index is not None]
    row_size = math.prod(shape[1:])
    rows_per_block = max(1, block_elements // max(1, row_size))
    block_of_row = rows // rows_per_block
    generator = torch.Generator(device=generator_device)
    for block in torch.unique(block_of_row).tolist():
        where = (block_of_row == block).nonzero().flatten()
        start = block * rows_per_block
        count = min(rows_per_block, shape[0] - start)
        values = torch.empty((count, *shape[1:]), device=generator.device)
        generator.manual_seed(block_seed(seed, key, block))
        fill(values, generator)
        held = rows[where]
        if len(held) != count or not torch.equal(held, torch.arange(start, start + count)):
            values = values.index_select(0, (held - start).to(values.device))
        for dim, index in columns:
            values = values.index_select(dim, index.to(values.device))
        values = values.to(device=local.device, dtype=local.dtype)
        first = int(where[0])
        if torch.equal(where, torch.arange(first, first + len(where))):
            local.narrow(0, first, len(where)).copy_(values)
        else:
            local.index_copy_(0, where.to(local.device), values)
    return tensor


def _shard_dim(placement: Placement, ndim: int, key: str) -> int | None:
    """The tensor dim a placement splits (``Shard`` and torch's strided shard), else None."""
    if placement.is_partial():
        raise ValueError(
            f"fill_blockwise_ cannot fill {key!r}: its placement {placement} is a pending "
            "reduction, not a value; initialize parameters, which are Shard or Replicate"
        )
    dim = getattr(placement, "dim", None)
    return dim % ndim if isinstance(dim, int) else None


def _local_indices(tensor: DTensor, key: str) -> list[torch.Tensor | None]:
    """For each dim, the global indices of this rank's entries (``None``: the whole dim).

    Distributing an index vector with the tensor's own placements on that dim (the others
    replicated) reproduces exactly how torch splits it, uneven and strided shards included,
    without communication.
    """
    ndim, mesh = tensor.ndim, tensor.device_mesh
    dims = [_shard_dim(p, ndim, key) for p in tensor.placements]
    kwargs = {"src_data_rank": None} if _DISTRIBUTE_TAKES_SRC_RANK else {}
    indices: list[torch.Tensor | None] = []
    for dim in range(ndim):
        if dim not in dims:
            indices.append(None)
            continue
        placements = [p if d == dim else Replicate() for p, d in zip(tensor.placements, dims)]
        view = [1] * ndim
        view[dim] = tensor.shape[dim]
        index = torch.arange(tensor.shape[dim]).view(view)
        local = distribute_tensor(index, mesh, placements, **kwargs).to_local()
        indices.append(local.flatten().cpu())
    return indices
