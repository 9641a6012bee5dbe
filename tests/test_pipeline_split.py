"""Cutting models into pipeline stages: names kept, balanced stages, and every refusal."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dream_trainer.configs import PipelineParallelConfig
from dream_trainer.parallel.pipeline import (
    SparseModuleList,
    balanced_stages,
    merge_parts,
    split_model,
    stage_indices,
    stage_modules,
)
from dream_trainer.parallel.pipeline.schedule import check_microbatches
from tests.parity_model import TinyTransformer


def names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()}


def test_balanced_stages_count_the_embedding_and_head_as_blocks():
    model = TinyTransformer(n_layers=6)
    assert balanced_stages(model, 2) == [
        ["tok_embeddings", "layers.0", "layers.1", "layers.2"],
        ["layers.3", "layers.4", "layers.5", "norm", "output"],
    ]
    # Weighted 2 each: the end stages take fewer blocks.
    # Weighted 2 each, the end stages take fewer blocks: weights 3, 2, 2, 3.
    assert balanced_stages(model, 4, 2.0, 2.0) == [
        ["tok_embeddings", "layers.0"],
        ["layers.1", "layers.2"],
        ["layers.3", "layers.4"],
        ["layers.5", "norm", "output"],
    ]


def test_stages_keep_the_unsplit_models_parameter_names_and_together_hold_all():
    model = TinyTransformer(n_layers=4)
    stages = stage_modules(model, balanced_stages(model, 4))
    parts = [split_model(model, keep) for keep in stages]
    assert set().union(*(names(p) for p in parts)) == names(model)
    assert sum(len(names(p)) for p in parts) == len(names(model))
    first, last = parts[0], parts[-1]
    assert first.output is None and first.norm is None and last.tok_embeddings is None
    assert isinstance(first.layers, SparseModuleList) and list(first.layers._modules) == ["0"]
    assert [type(b).__name__ for b in parts[2].layers] == ["Block"]  # iterates like the list
    with pytest.raises(KeyError, match=r"block 0 is not on this pipeline stage \(it holds"):
        parts[2].layers[0]
    merged = merge_parts([parts[0], parts[2]], [0, 2])
    assert names(merged) == names(parts[0]) | names(parts[2])
    assert merged.layers["2"] is parts[2].layers["2"]  # a view: nothing is copied


def test_a_pipelined_model_cannot_be_called_directly():
    model = TinyTransformer(n_layers=2)
    merged = merge_parts([model], [0])
    with pytest.raises(RuntimeError, match=r"use self.forward_backward\(model, inputs"):
        merged(torch.zeros(1, 4, dtype=torch.long))


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="4 pipeline stages need at least 4 blocks, but "):
        balanced_stages(TinyTransformer(n_layers=2), 4)


def test_a_model_without_a_block_container_asks_for_split_points():
    with pytest.raises(ValueError, match=r"give pipeline_parallel_config\.split_points"):
        balanced_stages(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2)


def test_a_custom_split_that_loses_or_duplicates_a_parameter_is_refused():
    model = TinyTransformer(n_layers=2)
    with pytest.raises(ValueError, match=r"leaves 1 parameter on no stage \(first: \['output"):
        stage_modules(model, [["tok_embeddings", "layers.0"], ["layers.1", "norm"]])
    with pytest.raises(ValueError, match=r"puts .* parameters on several stages"):
        stage_modules(model, [["tok_embeddings", "layers"], ["layers.1", "norm", "output"]])
    with pytest.raises(ValueError, match=r"names \['layers\.7'\], which are neither"):
        stage_modules(model, [["tok_embeddings", "layers.7"], ["layers", "norm", "output"]])


def test_tied_weights_across_stages_are_refused():
    model = TinyTransformer(n_layers=2)
    model.output.weight = model.tok_embeddings.weight
    with pytest.raises(ValueError, match="are one tied parameter, but the pipeline split"):
        stage_modules(model, balanced_stages(model, 2))


@pytest.mark.parametrize(
    ("schedule", "per_rank", "rank", "expected"),
    [
        ("1F1B", None, 1, [1]),
        ("Interleaved1F1B", None, 1, [1, 3]),
        ("LoopedBFS", 3, 0, [0, 2, 4]),
        ("ZBVZeroBubble", None, 0, [0, 3]),
        ("DualPipeV", None, 1, [1, 2]),
    ],
)
def test_stage_indices_follow_the_schedules_layout(schedule, per_rank, rank, expected):
    config = PipelineParallelConfig(schedule=schedule, stages_per_rank=per_rank)
    assert stage_indices(config, rank, 2) == expected


def test_v_shaped_and_single_stage_schedules_refuse_other_stage_counts():
    with pytest.raises(ValidationError, match="places exactly 2 stages on each rank"):
        PipelineParallelConfig(schedule="zbvzerobubble", stages_per_rank=3)
    with pytest.raises(ValidationError, match="runs one stage per rank, but stages_per_rank=2"):
        PipelineParallelConfig(schedule="1f1b", stages_per_rank=2)


def test_microbatch_counts_are_checked_against_schedule_and_batch(caplog):
    with pytest.raises(ValueError, match="needs at least as many microbatches as stages"):
        check_microbatches(PipelineParallelConfig(num_microbatches=1), 2, 2, 8)
    with pytest.raises(ValueError, match=r"batch of 6 samples .* num_microbatches=4"):
        check_microbatches(PipelineParallelConfig(num_microbatches=4), 2, 2, 6)
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        check_microbatches(
            PipelineParallelConfig(schedule="Interleaved1F1B", num_microbatches=5), 4, 2, 10
        )
    with caplog.at_level(logging.WARNING, logger="dream_trainer.parallel"):
        gpipe = PipelineParallelConfig(schedule="GPipe", num_microbatches=1)
        assert check_microbatches(gpipe, 4, 4, 8) == 1
    assert "idle about 75% of a step" in caplog.text
    assert check_microbatches(PipelineParallelConfig(), 4, 4, 8) == 4  # default: one per stage
