"""EvalMetricMixin: torchmetrics metrics updated in validation_step, synced over data-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch

from dream_trainer.trainer.base import BaseTrainer
from dream_trainer.trainer.mixins.registry import assigned_during


def require_torchmetrics() -> Any:
    """Import torchmetrics or say which extra installs it."""
    try:
        import torchmetrics
    except ImportError as error:
        raise ImportError(
            "EvalMetricMixin needs torchmetrics: pip install 'dream-trainer[metrics]'"
        ) from error
    return torchmetrics


class EvalMetricMixin(BaseTrainer):
    """Assign ``torchmetrics`` metrics in ``configure_metrics``; update them in ``validation_step``.

    At the end of each validation they are computed over all data- and context-parallel ranks
    (not the TP or PP peers, which see the same tokens), added to the validation results and
    reset.
    """

    def configure_metrics(self) -> None:
        """Assign ``torchmetrics.Metric`` / ``MetricCollection`` objects to ``self``."""

    def named_metrics(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in getattr(self, "_metric_names", ())}

    def setup(self) -> None:
        super().setup()
        self._metric_names: list[str] = []
        if type(self).configure_metrics is EvalMetricMixin.configure_metrics:
            return  # no metrics declared: don't pay for importing torchmetrics
        torchmetrics = require_torchmetrics()
        kinds = (torchmetrics.Metric, torchmetrics.MetricCollection)
        with assigned_during(self, lambda v: isinstance(v, kinds)) as found:
            self.configure_metrics()
        # Context-parallel ranks see other tokens of the same samples: they sync too.
        mesh = self.world.get_mesh("dp_cp")
        group = mesh.get_group() if mesh.size() > 1 else None
        for metric in found.values():
            metric.to(self.device)
            metrics = metric.values() if hasattr(metric, "values") else [metric]
            for m in metrics:
                m.process_group = group
        self._metric_names = list(found)

    def collect_validation_metrics(self) -> dict[str, float]:
        results = super().collect_validation_metrics()
        for name, metric in self.named_metrics().items():
            value = metric.compute()
            items = value.items() if isinstance(value, dict) else [(name, value)]
            for key, item in items:
                results[key] = float(item) if isinstance(item, torch.Tensor) else item
            metric.reset()
        return results
