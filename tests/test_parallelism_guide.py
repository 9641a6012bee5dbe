"""Every snippet of the parallelism guide runs (see tests/guide_snippets.py) and trains like one
process: the guide's config and hooks on 2 or 4 CPU ranks, against the same model, data and seed
on one rank without parallelism (fp32: losses within 1e-5 relative)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from dream_trainer import DreamTrainerConfig
from dream_trainer.configs import DeviceParameters
from tests import guide_snippets as guide
from tests.multirank import run_on_ranks


def guide_run(
    config_fn: Callable[[], DreamTrainerConfig],
    mixin: type | None,
    model_kind: str,
    device_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the guide's config (with ``mixin``'s hooks) on this rank; return the logged losses."""
    config = guide.as_guide_config(config_fn(), model_kind)
    if device_overrides:
        params = DeviceParameters.model_validate(
            {**config.device_parameters.model_dump(), **device_overrides}
        )
        config = config.model_copy(update={"device_parameters": params})
    bases = (mixin, guide.GuideTrainer) if mixin is not None else (guide.GuideTrainer,)
    trainer_class = type("Trainer", bases, {})
    trainer = trainer_class(config)
    trainer.losses = []
    trainer.fit()
    return {"losses": trainer.losses, "compute_dtype": getattr(trainer, "compute_dtype", None)}


def single_device(**precision: Any) -> DreamTrainerConfig:
    return DreamTrainerConfig(device_parameters=DeviceParameters.SINGLE_DEVICE(**precision))


_REFERENCES: dict[tuple[str, str], list[float]] = {}


def reference(model_kind: str, **precision: Any) -> list[float]:
    key = (model_kind, repr(sorted(precision.items())))
    if key not in _REFERENCES:
        (result,) = run_on_ranks(
            guide_run, 1, single_device, None, model_kind, precision or None, timeout=300
        )
        assert len(result["losses"]) == guide.STEPS
        _REFERENCES[key] = result["losses"]
    return _REFERENCES[key]


def assert_losses_match(results: list[dict[str, Any]], expected: list[float], rtol: float) -> None:
    for rank, result in enumerate(results):
        torch.testing.assert_close(
            torch.tensor(result["losses"]),
            torch.tensor(expected),
            rtol=rtol,
            atol=0,
            msg=lambda m, r=rank: f"rank {r} differs from one process: {m}",
        )


SNIPPETS = {
    # name: (ranks, config, trainer hooks, model)
    "data_parallel_replicate": (2, guide.ddp_config, guide.DDPTrainer, "blocks"),
    "fsdp2_api": (2, guide.fsdp_config, guide.FSDPTrainer, "blocks"),
    "fsdp2_utils_protocol": (2, guide.fsdp_config, guide.ProtocolFSDPTrainer, "protocol"),
    "tensor_parallel_plans": (2, guide.tp_config, guide.TPTrainer, "tp"),
    "context_parallel_section": (4, guide.cp_section_config, None, "tp"),
    "pipeline_parallel": (2, guide.pp_config, guide.PPTrainer, "tp"),
}


@pytest.mark.parametrize("snippet", list(SNIPPETS))
def test_guide_snippet_trains_like_one_process(snippet):
    ranks, config_fn, mixin, model_kind = SNIPPETS[snippet]
    results = run_on_ranks(guide_run, ranks, config_fn, mixin, model_kind, timeout=900)
    assert_losses_match(results, reference(model_kind), rtol=1e-5)
    # compute_dtype is seen where the loss is computed: on the last pipeline stage.
    assert {r["compute_dtype"] for r in results} <= {torch.float32, None}
    assert torch.float32 in {r["compute_dtype"] for r in results}


def test_guide_fsdp_plus_tensor_parallel_with_mixed_precision_trains_like_one_process():
    # bf16 parameters: compared with one process under the same mixed-precision policy (the
    # runs differ by up to 3e-4 relative: bf16 rounding under other reduction orders).
    results = run_on_ranks(guide_run, 4, guide.fsdp_tp_config, None, "tp", timeout=600)
    expected = reference("tp", param_dtype="bfloat16", reduce_dtype="float32")
    assert_losses_match(results, expected, rtol=2e-3)
    assert all(r["compute_dtype"] is torch.bfloat16 for r in results)


def test_guide_configs_resolve_to_the_documented_layouts():
    from dream_trainer.world import MeshLayout

    assert MeshLayout.resolve(guide.ddp_config().device_parameters, 4).dp_replicate == 4
    assert MeshLayout.resolve(guide.fsdp_config().device_parameters, 4).dp_shard == 4
    assert MeshLayout.resolve(guide.tp_config().device_parameters, 4).tp == 4
    combined = guide.fsdp_tp_config().device_parameters
    assert (MeshLayout.resolve(combined, 4).dp_shard, combined.tensor_parallel) == (2, 2)
    assert combined.param_dtype is torch.bfloat16 and combined.reduce_dtype is torch.float32
