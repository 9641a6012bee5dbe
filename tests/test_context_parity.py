"""Context parallelism trains exactly like one process (fp32, losses and final weights).

The parity model of tests/test_trainer_parity.py calls context_parallel_attention; every batch is
cut along the sequence by the trainer before training_step sees it. 8 optimizer steps with
gradient accumulation 2 and clipping; losses within 1e-5 relative, weights within 1e-4 (AdamW).
"""

from __future__ import annotations

from typing import Any

import pytest

from dream_trainer.configs import DeviceParameters
from tests.multirank import run_on_ranks
from tests.test_trainer_parity import assert_matches_reference, train
from tests.trainer_fixtures import caught


def context(cp: int, rotate: str = "allgather", load_balance: bool = True, **degrees: Any):
    return DeviceParameters(
        context_parallel=cp,
        **{"dp_shard": 1, **degrees},
        context_parallel_config={"rotate_method": rotate, "load_balance": load_balance},
    )


LAYOUTS = {
    "cp2": (2, context(2), {}),
    "cp2_alltoall_unbalanced": (2, context(2, "alltoall", load_balance=False), {}),
    "cp4": (4, context(4), {}),
    "cp4_alltoall": (4, context(4, "alltoall"), {}),
    "cp2_fsdp2": (4, context(2, dp_shard=2), {}),
    "cp2_tp2_sp": (4, context(2, tensor_parallel=2), {"sequence_parallel": True}),
    "cp2_pp2": (
        4,
        DeviceParameters(
            context_parallel=2,
            pipeline_parallel=2,
            dp_shard=1,
            pipeline_parallel_config={"schedule": "1F1B", "num_microbatches": 2},
        ),
        {"n_layers": 2},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_layout_matches_one_process(layout):
    world_size, params, overrides = LAYOUTS[layout]
    results = run_on_ranks(train, world_size, params, "adamw", timeout=600, **overrides)
    assert_matches_reference(results, "adamw", pipelined=params.pipeline_parallel != 1)


def fit_guide_model_under_context_parallelism() -> dict[str, Any]:
    from tests import guide_snippets as guide

    config = guide.as_guide_config(guide.tp_config(), "blocks")
    config.device_parameters = context(2)
    return caught(lambda: guide.GuideTrainer(config).fit())


def test_a_model_whose_attention_bypasses_context_parallelism_is_refused():
    # The guide's filled-in Attention calls scaled_dot_product_attention directly.
    for result in run_on_ranks(fit_guide_model_under_context_parallelism, 2):
        assert result["error"] == "RuntimeError"
        assert "computed no attention through" in result["message"]
        assert "context_parallel_attention(q, k, v, ...)" in result["message"]


def fit_with_sequence_of(length: int) -> dict[str, Any]:
    from tests import parity_model

    parity_model.SEQ = length  # the dataset reads it when it is built
    try:
        return caught(train, context(2, tensor_parallel=2), "adamw", sequence_parallel=True)
    finally:
        parity_model.SEQ = 16


def test_a_sequence_that_does_not_split_names_the_multiple_needed():
    for result in run_on_ranks(fit_with_sequence_of, 4, 12):
        assert result["error"] == "ValueError"
        assert (
            "must be a multiple of 8 (2 x context_parallel=2 x tensor_parallel=2)"
            in (result["message"])
        )
