"""A distributed sampler that can continue its epoch's global order under another layout.

Each epoch is one permutation of the dataset (seeded by ``seed + epoch``), independent of the
number of data-parallel ranks; rank ``r`` of ``R`` takes every ``R``-th sample of it, starting
at ``r``. After ``n`` samples of the order were consumed by all ranks together, the sampler can
resume at global position ``n`` with any ``R``: no sample is lost or repeated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["GlobalOrderSampler"]


class GlobalOrderSampler(Sampler[int]):
    """This data-parallel rank's share of a seeded global sample order, resumable anywhere."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in 0..{num_replicas - 1}")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._yielded = 0
        self.start = 0
        """Global position in this epoch's order where iteration begins (after a resume)."""

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a resume position set for another epoch no longer applies."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Continue ``epoch`` after its first ``position`` samples (counted over all ranks)."""
        if not 0 <= position <= len(self.dataset):
            raise ValueError(
                f"cannot resume at sample {position} of a dataset of {len(self.dataset)}"
            )
        self.epoch, self.start, self._yielded = epoch, position, 0

    def order(self) -> list[int]:
        """This epoch's global order of dataset indices."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=generator).tolist()

    def _share(self) -> int:
        remaining = len(self.dataset) - self.start
        if self.drop_last:
            return remaining // self.num_replicas
        return -(-remaining // self.num_replicas)

    def __len__(self) -> int:
        return self._share()

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.start :]
        share = self._share()
        if not self.drop_last and share * self.num_replicas > len(order):  # pad like torch
            order += order[: share * self.num_replicas - len(order)]
        self._yielded = 0
        for index in order[self.rank : share * self.num_replicas : self.num_replicas]:
            self._yielded += 1
            yield index
        # A full pass ends the epoch: used on its own, the next pass reshuffles.
        self.epoch, self.start, self._yielded = self.epoch + 1, 0, 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and the global position reached in it (every rank yields alike)."""
        return {"epoch": self.epoch, "position": self.start + self._yielded * self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(int(state["epoch"]), int(state["position"]))
