"""Gradient accumulation: k micro-batches on N data-parallel ranks equal one batch of k x N.

Gradients are captured just before each optimizer step (full tensors gathered from the
shards) and compared with plain torch in one process: fp32, SGD, atol 1e-6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dream_trainer.configs import DeviceParameters
from tests.loop_fixtures import (
    CaptureBeforeStep,
    LoopTrainer,
    SequenceData,
    assert_tensors_close,
    full_grads,
    loop_config,
    mean_loss,
    reference_model,
    reference_sgd,
    valid_tokens,
)
from tests.multirank import run_on_ranks

pytestmark = pytest.mark.multirank

ACCUM, RANKS, BATCH = 2, 2, 2
PER_STEP = ACCUM * RANKS * BATCH  # samples per optimizer step
LAYOUTS = {"fsdp": DeviceParameters.FSDP(), "ddp": DeviceParameters.DDP()}


def train_and_capture(
    params: DeviceParameters, token_normalized: bool, pad: bool, steps: int
) -> dict[str, Any]:
    capture = CaptureBeforeStep()
    config = loop_config(
        params,
        dataset_size=steps * PER_STEP,
        batch_size=BATCH,
        pad=pad,
        token_normalized=token_normalized,
        gradient_accumulation_steps=ACCUM,
    )
    trainer = LoopTrainer(config, callbacks=[capture])
    trainer.fit()
    return {"grads": capture.grads, "weights": capture.weights, "seen": trainer.seen}


def whole_batches(steps: int, pad: bool) -> list[dict[str, Any]]:
    data = SequenceData(steps * PER_STEP, pad=pad)
    return [data.batch(list(range(s * PER_STEP, (s + 1) * PER_STEP))) for s in range(steps)]


def assert_each_step_covers_its_samples(results: list[dict[str, Any]], steps: int) -> None:
    for step in range(steps):
        ids = sorted(i for r in results for _, s, b in r["seen"] if s == step for i in b)
        assert ids == list(range(step * PER_STEP, (step + 1) * PER_STEP))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_micro_batches_on_two_ranks_equal_one_batch_of_four_in_one_process(layout):
    results = run_on_ranks(train_and_capture, RANKS, LAYOUTS[layout], False, False, 2)
    assert_each_step_covers_its_samples(results, 2)
    ref_grads, ref_weights = reference_sgd(whole_batches(2, pad=False))
    for rank, result in enumerate(results):
        assert len(result["grads"]) == 2
        for step in range(2):
            what = f"rank {rank} step {step}"
            assert_tensors_close(result["weights"][step], ref_weights[step], 1e-6, what)
            assert_tensors_close(result["grads"][step], ref_grads[step], 1e-6, what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_token_normalized_micro_batches_weigh_every_valid_token_equally(layout):
    results = run_on_ranks(train_and_capture, RANKS, LAYOUTS[layout], True, True, 2)
    assert_each_step_covers_its_samples(results, 2)
    tokens = [sum(valid_tokens(i) for i in b) for r in results for _, s, b in r["seen"] if s == 0]
    assert len(set(tokens)) > 2, f"micro-batches must hold uneven token counts, got {tokens}"
    ref_grads, ref_weights = reference_sgd(whole_batches(2, pad=True), token_normalized=True)
    for rank, result in enumerate(results):
        for step in range(2):
            what = f"rank {rank} step {step}"
            assert_tensors_close(result["weights"][step], ref_weights[step], 1e-6, what)
            assert_tensors_close(result["grads"][step], ref_grads[step], 1e-6, what)


def test_mean_loss_with_uneven_valid_tokens_is_not_the_token_mean():
    # Why backward(loss_sum, num_tokens=...) exists: averaging micro-batch means over-weighs
    # tokens of micro-batches that hold few valid tokens.
    results = run_on_ranks(train_and_capture, RANKS, LAYOUTS["ddp"], False, True, 1)
    got = results[0]["grads"][0]
    token_grads, _ = reference_sgd(whole_batches(1, pad=True), token_normalized=True)
    gap = max((got[n] - token_grads[0][n]).abs().max().item() for n in got)
    assert gap > 1e-3
    # ... and it is exactly the average of the micro-batch means, as documented.
    data, model = SequenceData(PER_STEP, pad=True), reference_model()
    micro_batches = [b for r in results for _, _, b in r["seen"]]
    assert len(micro_batches) == ACCUM * RANKS
    torch.stack([mean_loss(model, data.batch(b)) for b in micro_batches]).mean().backward()
    expected = full_grads(model)
    assert_tensors_close(got, expected, 1e-6, "mean-loss gradient")


# Sync suppression: count the gradient reductions each backward() issues.

REDUCTIONS = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single")


@contextlib.contextmanager
def counting_reductions() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in REDUCTIONS if hasattr(dist, name)}

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class CountingTrainer(LoopTrainer):
    def backward(self, loss: torch.Tensor, num_tokens: Any = None) -> None:
        with counting_reductions() as calls:
            super().backward(loss, num_tokens)
        self.reductions = getattr(self, "reductions", [])
        self.reductions.append(len(calls))


def count_reductions_per_backward(params: DeviceParameters, accum: int) -> list[int]:
    config = loop_config(params, dataset_size=16, gradient_accumulation_steps=accum)
    trainer = CountingTrainer(config)
    trainer.fit()
    return trainer.reductions


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_are_reduced_only_on_the_last_micro_batch(layout):
    # 16 samples / 2 ranks / batch 2 = 4 micro-batches per rank.
    accumulated = run_on_ranks(count_reductions_per_backward, RANKS, LAYOUTS[layout], 2)
    single = run_on_ranks(count_reductions_per_backward, RANKS, LAYOUTS[layout], 1)
    for rank in range(RANKS):
        per_step = single[rank][0]
        assert per_step > 0, "the data-parallel wrapper must reduce gradients in backward"
        assert single[rank] == [per_step] * 4
        # Micro-batch 1 of each group: no communication; micro-batch 2: one step's worth.
        assert accumulated[rank] == [0, per_step, 0, per_step]
