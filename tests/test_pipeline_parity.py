"""Pipeline parallelism trains exactly like one process: every schedule, and PP with FSDP and TP.

Same model (4 blocks), data and seed as tests/test_trainer_parity.py: 8 optimizer steps in fp32
with gradient accumulation 2 and clipping; losses within 1e-5 relative of one process, final
weights within 1e-4 (AdamW). A pipeline rank holds only its stages' weights; together the ranks
hold every weight, under the unsplit model's names.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters
from tests.multirank import run_on_ranks
from tests.test_trainer_parity import assert_matches_reference, train

BLOCKS = 4


def pipelined(schedule: str, microbatches: int = 4, **degrees: Any) -> DeviceParameters:
    return DeviceParameters(
        pipeline_parallel=2,
        **{"dp_shard": 1, **degrees},
        pipeline_parallel_config={"schedule": schedule, "num_microbatches": microbatches},
    )


SCHEDULES = [
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_schedule_matches_one_process(schedule):
    results = run_on_ranks(train, 2, pipelined(schedule), "adamw", n_layers=BLOCKS, timeout=300)
    assert_matches_reference(results, "adamw", pipelined=True, n_layers=BLOCKS)


LAYOUTS = {
    "pp2_fsdp2": (4, pipelined("1F1B", dp_shard=2), {}),
    "pp2_tp2_sp": (4, pipelined("Interleaved1F1B", tensor_parallel=2), {"sequence_parallel": True}),
    # 8 ranks on the 2-core CI machine: 2 microbatches (1F1B's minimum for 2 stages) halve the
    # time; the schedules themselves are tested with 4 above.
    "pp2_fsdp2_tp2": (
        8,
        pipelined("1F1B", microbatches=2, dp_shard=2, tensor_parallel=2),
        {"sequence_parallel": True},
    ),
    # Per part: activation checkpointing and compile (aot_eager) on each stage's blocks.
    "pp2_checkpointing_compile": (
        2,
        pipelined("Interleaved1F1B").model_copy(
            update={
                "checkpoint_activations": True,
                "compile_model": True,
                "compile_backend": "aot_eager",
            }
        ),
        {},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_composed_with_other_layouts_matches_one_process(layout):
    world_size, params, overrides = LAYOUTS[layout]
    results = run_on_ranks(
        train, world_size, params, "adamw", n_layers=BLOCKS, timeout=600, **overrides
    )
    assert_matches_reference(results, "adamw", pipelined=True, n_layers=BLOCKS)


def test_clipping_uses_the_norm_of_every_stages_gradients():
    # A clip far below the gradient norm scales every step; a rank that clipped by its own
    # stage's norm only would diverge from one process at once.
    results = run_on_ranks(
        train, 2, pipelined("1F1B"), "sgd", n_layers=BLOCKS, clip=0.01, timeout=300
    )
    assert_matches_reference(results, "sgd", pipelined=True, n_layers=BLOCKS, clip=0.01)


def test_token_normalized_loss_under_pipeline_and_ddp_matches_one_process():
    # The summed loss differs per data-parallel share, so only the final weights are compared:
    # each token weighs the same whatever micro-batch, microbatch or rank it lands on.
    params = pipelined("GPipe", dp_replicate=2)
    results = run_on_ranks(
        train, 4, params, "sgd", n_layers=BLOCKS, token_normalized=True, timeout=300
    )
    (reference,) = run_on_ranks(
        train, 1, DeviceParameters.SINGLE_DEVICE(), "sgd", n_layers=BLOCKS, token_normalized=True
    )
    held = {}
    for result in results:
        held.update(result["weights"])
    assert held.keys() == reference["weights"].keys()
    for name, value in held.items():
        torch.testing.assert_close(value, reference["weights"][name], rtol=0, atol=1e-6)
