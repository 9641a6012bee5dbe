"""PredictMixin: the trainer's models serving data-parallel batch inference."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from dream_trainer.inference import StreamSummary, distributed_map, distributed_map_to_jsonl
from dream_trainer.inference.ordered import Gather, OnError
from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.console_logging import ensure_console_logging

logger = logging.getLogger("dream_trainer.trainer")


class PredictMixin(BaseTrainer):
    """``predict`` and ``predict_to_jsonl``: ``predict_step`` over items on every replica.

    A replica is one data-parallel index: a TP group, a CP group or a PP pipeline acts as one
    model. Items are split evenly (33 on 4 replicas: 9, 8, 8, 8) and every result comes back
    once, in input order. Inside :meth:`serving` the world is launched and the models are set up
    (weights from ``checkpoint_parameters.init_from``) without dataloaders or optimizers.
    """

    def predict_step(self, batch: list[Any]) -> Sequence[Any]:
        """Return one result per item of ``batch`` (runs under ``torch.no_grad``, models in eval).

        Runs on every rank of the replica; use ``self.forward_outputs(model, inputs)`` so the
        same code works under pipeline parallelism.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement predict_step to predict")

    def _check_predict_step(self) -> None:
        if type(self).predict_step is PredictMixin.predict_step:
            raise NotImplementedError(
                f"{type(self).__name__} must implement predict_step(batch) -> one result per "
                "item to predict"
            )

    @contextmanager
    def serving(self) -> Iterator[PredictMixin]:
        """Launch the world, configure and set up the models for inference; tear down on exit."""
        if self.serving_only and hasattr(self.world, "layout"):
            yield self  # already serving: predict inside serving()
            return
        self.serving_only = True
        ensure_console_logging()
        try:
            self.world.launch()
            torch.manual_seed(self.config.seed)
            self.configure()
            self.setup()
            for parts in self.model_parts().values():
                for part in parts:
                    part.eval()
        except BaseException:
            self._teardown(abort=True)
            self.serving_only = False
            raise
        try:
            yield self
        except BaseException:
            self._teardown(abort=True)
            raise
        else:
            self._teardown(abort=False)
        finally:
            self.serving_only = False

    def _predict_call(self) -> Callable[[list[Any]], Sequence[Any]]:
        def call(batch: list[Any]) -> Sequence[Any]:
            with torch.no_grad():
                return self.predict_step(batch)

        return call

    def predict(
        self,
        items: Sequence[Any],
        *,
        batch_size: int = 1,
        gather: Gather = "rank0",
        on_error: OnError = "raise",
    ) -> list[Any] | None:
        """``predict_step`` over ``items`` (the same list on every rank); results in input order.

        Returns the results on rank 0 (``gather="all"``: on every rank), ``None`` elsewhere.
        Launches and tears down the world itself unless called inside :meth:`serving`.
        """
        self._check_predict_step()
        if not self.serving_only:
            with self.serving():
                return self.predict(items, batch_size=batch_size, gather=gather, on_error=on_error)
        return distributed_map(
            self._predict_call(),
            items,
            batch_size=batch_size,
            world=self.world,
            gather=gather,
            on_error=on_error,
        )

    def predict_to_jsonl(
        self,
        items: Sequence[Any],
        path: str | os.PathLike[str],
        *,
        key: str | Callable[[Any], Any] = "id",
        resume: bool = False,
        batch_size: int = 1,
        window: int | None = None,
        on_error: OnError = "raise",
    ) -> StreamSummary:
        """``predict_step`` over a whole dataset, appended to ``path`` in input order by rank 0.

        Each record holds its item's primary key ``key``; with ``resume`` the keys already in
        the file are skipped (see :func:`~dream_trainer.inference.distributed_map_to_jsonl`).
        """
        self._check_predict_step()
        if not self.serving_only:
            with self.serving():
                return self.predict_to_jsonl(
                    items,
                    path,
                    key=key,
                    resume=resume,
                    batch_size=batch_size,
                    window=window,
                    on_error=on_error,
                )
        return distributed_map_to_jsonl(
            self._predict_call(),
            items,
            path,
            key=key,
            resume=resume,
            batch_size=batch_size,
            window=window,
            world=self.world,
            on_error=on_error,
        )
