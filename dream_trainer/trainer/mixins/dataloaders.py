"""DataLoaderSetupMixin: train/validation loaders, each data-parallel rank on its own samples."""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset, DistributedSampler

from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.samplers import GlobalOrderSampler

logger = logging.getLogger("dream_trainer.trainer")


Sharding = DistributedSampler[Any] | GlobalOrderSampler


def _warn_about_uneven_split(role: str, sampler: Sharding, rank: int) -> None:
    """Say (from rank 0) when the dataset does not split evenly over data-parallel ranks."""
    size = len(sampler.dataset)  # type: ignore[arg-type]
    replicas = sampler.num_replicas
    if rank != 0 or size % replicas == 0:
        return
    if sampler.drop_last:
        logger.warning(
            "the %s dataset has %d samples, not a multiple of the %d data-parallel ranks: each "
            "rank gets %d and %d samples are never seen this epoch",
            role,
            size,
            replicas,
            size // replicas,
            size % replicas,
        )
    else:
        logger.warning(
            "the %s dataset has %d samples, not a multiple of the %d data-parallel ranks: "
            "the sampler repeats %d samples so every rank gets %d",
            role,
            size,
            replicas,
            replicas - size % replicas,
            len(sampler),
        )


class DataLoaderSetupMixin(BaseTrainer):
    """Runs ``configure_dataloaders`` and checks that samplers split data by data-parallel rank."""

    def configure_dataloaders(self) -> tuple[Any, Any | None]:
        """Return ``(train_loader, val_loader_or_None)``.

        Ranks that share a data-parallel index (TP, CP and PP peers) must see the same batches:
        shard by ``self.world.dp_rank`` / ``self.world.dp_size``, e.g. with
        :meth:`distributed_sampler`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement configure_dataloaders")

    def distributed_sampler(
        self, dataset: Dataset[Any], shuffle: bool = True, drop_last: bool = True
    ) -> GlobalOrderSampler:
        """A sampler giving this data-parallel rank a disjoint, equal-sized part of ``dataset``.

        The same order as torch's ``DistributedSampler`` (seeded by ``config.seed + epoch``),
        and a checkpoint can resume it mid-epoch under another data-parallel degree.
        """
        return GlobalOrderSampler(
            dataset,  # type: ignore[arg-type]
            num_replicas=self.world.dp_size,
            rank=self.world.dp_rank,
            shuffle=shuffle,
            seed=self.config.seed,
            drop_last=drop_last,
        )

    def setup(self) -> None:
        super().setup()
        if self.serving_only:  # inference brings its own items
            self.train_dataloader, self.val_dataloader = None, None
            return
        loaders = self.configure_dataloaders()
        if not (isinstance(loaders, tuple) and len(loaders) == 2):
            raise TypeError(
                f"{type(self).__name__}.configure_dataloaders must return (train_loader, "
                f"val_loader or None), got {type(loaders).__name__}"
            )
        self.train_dataloader, self.val_dataloader = loaders
        for role, loader in (("train", self.train_dataloader), ("validation", self.val_dataloader)):
            self._check_sampler(role, loader)
        self._check_batch_size(self.train_dataloader)

    def _check_batch_size(self, loader: Any) -> None:
        sizes = self.batch_sizes
        batch_size = getattr(loader, "batch_size", None)
        if sizes is None or sizes.per_device is None or batch_size is None:
            return
        if batch_size != sizes.per_device:
            raise ValueError(
                f"the train loader's batch_size is {batch_size}, but training_parameters resolve "
                f"to {sizes.per_device} per device ({sizes.describe().removeprefix('batch sizes: ')}"
                "); build the loader with batch_size=self.batch_sizes.per_device"
            )

    def _check_sampler(self, role: str, loader: Any) -> None:
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, (DistributedSampler, GlobalOrderSampler)):
            return
        dp_size, dp_rank = self.world.dp_size, self.world.dp_rank
        if (sampler.num_replicas, sampler.rank) != (dp_size, dp_rank):
            raise ValueError(
                f"the {role} loader's {type(sampler).__name__} has num_replicas={sampler.num_replicas}, "
                f"rank={sampler.rank}, but this rank is data-parallel rank {dp_rank} of {dp_size} "
                "(TP/CP/PP peers must read the same data). Build it with "
                "self.distributed_sampler(dataset) or num_replicas=self.world.dp_size, "
                "rank=self.world.dp_rank."
            )
        _warn_about_uneven_split(role, sampler, self.world.rank)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dataloaders"] = {
            role: loader.state_dict()
            for role, loader in self.named_dataloaders().items()
            if hasattr(loader, "state_dict")
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for role, loader in self.named_dataloaders().items():
            saved = state_dict.get("dataloaders", {}).get(role)
            if saved is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(saved)
