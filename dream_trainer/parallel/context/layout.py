"""Where each token of a sequence lives under context parallelism, and which layout is active.

A sequence of ``L`` tokens is cut into ``2 x cp`` equal chunks (``cp`` without load balancing).
With head-tail load balancing rank ``i`` holds chunks ``i`` and ``2cp - 1 - i``, so under a causal
mask every rank does the same amount of attention work. The layout is active while the trainer
runs one batch (``training_step`` / ``validation_step``); attention and rotary embeddings read it
to know the global positions of the local tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ContextLayout",
    "activated",
    "active_layout",
    "global_sequence_length",
    "sequence_positions",
]

_ACTIVE: contextvars.ContextVar[ContextLayout | None] = contextvars.ContextVar(
    "dream_trainer_context_layout", default=None
)


@dataclass
class ContextLayout:
    """The context-parallel group and how sequences are split over it."""

    group: Any
    """The cp process group (``None`` only for a one-rank layout in tests)."""
    size: int
    rank: int
    load_balance: bool = True
    rotate_method: str = "allgather"
    attention_calls: int = field(default=0, compare=False)
    """How many attention calls went through the layout (to catch models that bypass it)."""

    @property
    def num_chunks(self) -> int:
        return 2 * self.size if self.load_balance else self.size

    def chunk_ids(self, rank: int | None = None) -> list[int]:
        """The chunk indices ``rank`` (default: this rank) holds, in local order."""
        r = self.rank if rank is None else rank
        return [r, 2 * self.size - 1 - r] if self.load_balance else [r]

    def check_length(self, length: int, multiple: int = 1) -> None:
        needed = self.num_chunks * multiple
        if length % needed:
            why = (
                f"2 x context_parallel={self.size}"
                if self.load_balance
                else (f"context_parallel={self.size}")
            )
            if multiple > 1:
                why += f" x tensor_parallel={multiple}"
            raise ValueError(
                f"a sequence of {length} tokens cannot be split for context parallelism: its "
                f"length must be a multiple of {needed} ({why}); pad or pack sequences to a "
                f"multiple of {needed}"
            )

    def positions(
        self, local_length: int, device: Any = None, rank: int | None = None
    ) -> torch.Tensor:
        """Global positions (int64) of the ``local_length`` tokens ``rank`` holds."""
        chunks = self.chunk_ids(rank)
        chunk = local_length // len(chunks)
        parts = [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunks]
        return torch.cat(parts)

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of ``tensor`` along ``dim`` (a copy; the full length is checked)."""
        self.check_length(tensor.shape[dim])
        pieces = tensor.chunk(self.num_chunks, dim=dim)
        return torch.cat([pieces[c] for c in self.chunk_ids()], dim=dim)


def active_layout() -> ContextLayout | None:
    """The layout of the batch being run, or ``None`` without context parallelism."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(layout: ContextLayout | None) -> Iterator[ContextLayout | None]:
    """Make ``layout`` the active one inside the block."""
    token = _ACTIVE.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE.reset(token)


def sequence_positions(local_length: int, device: Any = None) -> torch.Tensor:
    """Global positions of this rank's tokens: ``arange(local_length)`` without context
    parallelism, else the positions of the chunks this rank holds (for rotary embeddings)."""
    layout = active_layout()
    if layout is None:
        return torch.arange(local_length, device=device)
    return layout.positions(local_length, device)


def global_sequence_length(local_length: int) -> int:
    """The whole sequence's length from this rank's ``local_length`` (computed on the host, so
    a model can check it against its position table without a device sync)."""
    layout = active_layout()
    if layout is None:
        return local_length
    chunks = len(layout.chunk_ids())
    return local_length // chunks * layout.num_chunks
