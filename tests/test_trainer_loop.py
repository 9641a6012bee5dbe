"""The training loop's numerics and data handling, stated as behaviour.

Runs on 1, 2 or 4 CPU ranks through ``tests.multirank``; every trainer is a tiny SGD MLP.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from dream_trainer.configs import DeviceParameters
from dream_trainer.trainer import NonFiniteGradientError
from tests.loop_fixtures import (
    CaptureBeforeStep,
    ScriptedTrainer,
    SequenceData,
    Unsized,
    WeightsPerStep,
    assert_tensors_close,
    full_grads,
    full_weights,
    loop_config,
    mean_loss,
    ok,
    reference_model,
    reference_sgd,
    run,
)
from tests.multirank import run_on_ranks

pytestmark = pytest.mark.multirank

DDP = DeviceParameters.DDP()


# 4. Clipping


def test_clipping_in_the_loop_matches_torch_clip_grad_norm():
    (result,) = ok(
        run_on_ranks(run, 1, None, {}, dataset_size=12, batch_size=4, gradient_clip_val=0.01)
    )
    assert result["global_step"] == 3
    data = SequenceData(12)
    steps = [data.batch([4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3]) for s in range(3)]
    _, clipped = reference_sgd(steps, clip=0.01)
    assert_tensors_close(result["weights"], clipped[-1], 1e-6, "weights after 3 clipped steps")
    _, unclipped = reference_sgd(steps)
    gap = max((result["weights"][n] - unclipped[-1][n]).abs().max().item() for n in unclipped[-1])
    assert gap > 1e-3, "the gradients must be large enough for clipping to matter"


# 5. Non-finite gradients


def non_finite(on_non_finite_grad: str) -> dict[str, Any]:
    trainer = ScriptedTrainer(
        loop_config(DDP, dataset_size=12, on_non_finite_grad=on_non_finite_grad),
        callbacks=[WeightsPerStep()],
    )
    trainer.nan_at_step, trainer.nan_on_rank = 1, 1
    try:
        trainer.fit()
        error = None
    except NonFiniteGradientError as caught:
        error = str(caught)
    weights = trainer.weights_per_step
    return {
        "error": error,
        "step": trainer.global_step,
        "skipped": trainer.skipped_steps,
        "weights": [*weights, full_weights(trainer.model)],
    }


def test_a_nan_loss_raises_naming_the_step_the_rank_and_the_skip_option():
    # Only rank 1's loss is NaN on the 2nd step; DDP spreads it, so rank 0 must stop as well.
    results = run_on_ranks(non_finite, 2, "error")
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert "step 1" in result["error"] and f"rank {rank}" in result["error"]
        assert "on_non_finite_grad" in result["error"]
        assert result["step"] == 1


def test_skip_mode_skips_the_nan_step_and_keeps_training():
    results = run_on_ranks(non_finite, 2, "skip")
    for result in results:
        assert result["error"] is None
        assert result["step"] == 3 and result["skipped"] == 1
        before, after_first, after_skipped, final = result["weights"]
        for name in before:
            assert not torch.equal(before[name], after_first[name])
            assert torch.equal(after_first[name], after_skipped[name]), name
            assert not torch.equal(after_skipped[name], final[name])
            assert torch.isfinite(final[name]).all()


# 6. Data: sharding, epochs, uneven loaders


def group_by_dp_rank(results: list[dict[str, Any]], dp_of: list[int]) -> dict[int, list[Any]]:
    groups: dict[int, list[Any]] = {}
    for rank, result in enumerate(results):
        groups.setdefault(dp_of[rank], []).append(result["seen"])
    return groups


DATA_LAYOUTS = {
    "ddp2": (2, DDP, [0, 1]),
    "ddp4": (4, DDP, [0, 1, 2, 3]),
    # tp is the innermost mesh dim: ranks 0,1 and 2,3 are TP peers.
    "fsdp2_tp2": (4, DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2), [0, 0, 1, 1]),
}


@pytest.mark.parametrize("layout", list(DATA_LAYOUTS))
def test_data_parallel_ranks_read_disjoint_samples_covering_the_epoch(layout):
    world_size, params, dp_of = DATA_LAYOUTS[layout]
    results = ok(run_on_ranks(run, world_size, params, {}, dataset_size=16))
    groups = group_by_dp_rank(results, dp_of)
    covered: list[int] = []
    for dp_rank, seen in groups.items():
        assert all(peer == seen[0] for peer in seen), f"TP peers of dp rank {dp_rank} differ"
        covered += [i for _, _, ids in seen[0] for i in ids]
    assert sorted(covered) == list(range(16))


class RecordSetEpoch(ScriptedTrainer):
    def configure_dataloaders(self) -> tuple[Any, Any]:
        train, val = super().configure_dataloaders()
        original = train.sampler.set_epoch
        self.epochs_set: list[int] = []

        def record(epoch: int) -> None:
            self.epochs_set.append(epoch)
            original(epoch)

        train.sampler.set_epoch = record
        return train, val


def shuffled_epochs() -> list[dict[str, Any]]:
    runs = []
    for _ in range(2):
        trainer = RecordSetEpoch(loop_config(DDP, dataset_size=16, shuffle=True, n_epochs=3))
        trainer.fit()
        orders = [
            [i for e, _, ids in trainer.seen if e == epoch for i in ids] for epoch in range(3)
        ]
        runs.append({"epochs_set": trainer.epochs_set, "orders": orders})
    return runs


def test_sampler_epoch_advances_so_each_epoch_reshuffles_reproducibly():
    results = run_on_ranks(shuffled_epochs, 2)
    for first, rerun in results:
        assert first["epochs_set"] == [0, 1, 2]
        assert first["orders"] == rerun["orders"]
        assert len({tuple(order) for order in first["orders"]}) == 3
    for epoch in range(3):
        ids = [i for first, _ in results for i in first["orders"][epoch]]
        assert sorted(ids) == list(range(16))


def own_batches(rank_counts: list[int]) -> list[list[dict[str, Any]]]:
    data = SequenceData(sum(rank_counts))
    starts = [sum(rank_counts[:r]) for r in range(len(rank_counts))]
    return [[data.batch([s + i]) for i in range(n)] for s, n in zip(starts, rank_counts)]


def test_uneven_sized_loaders_without_a_sampler_run_the_shortest_length_without_hanging():
    batches = own_batches([6, 4])
    results = ok(run_on_ranks(run, 2, DDP, {"train_batches": {"per_rank": batches}}, timeout=60))
    for result in results:
        assert result["global_step"] == 4 and len(result["seen"]) == 4
        assert result["elapsed"] < 30  # a hang would last the 120 s gloo timeout


def test_uneven_unsized_iterables_stop_together():
    batches = [Unsized(b) for b in own_batches([5, 3])]
    results = ok(run_on_ranks(run, 2, DDP, {"train_batches": {"per_rank": batches}}, timeout=60))
    for result in results:
        assert result["global_step"] == 3 and len(result["seen"]) == 3


class Stream(IterableDataset):
    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_a_dataloader_over_an_unsized_iterable_dataset_trains():
    loaders = [DataLoader(Stream(b), batch_size=None) for b in own_batches([5, 3])]
    results = ok(run_on_ranks(run, 2, DDP, {"train_batches": {"per_rank": loaders}}, timeout=60))
    for result in results:
        assert result["global_step"] == 3


def partial_group(params: DeviceParameters, accum: int, per_epoch: int) -> dict[str, Any]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dream_trainer.trainer").addHandler(handler)
    capture = CaptureBeforeStep()
    trainer = ScriptedTrainer(
        loop_config(params, n_epochs=2, gradient_accumulation_steps=accum), callbacks=[capture]
    )
    rank = dist.get_rank()
    data = SequenceData(32)
    trainer.train_batches = Unsized([data.batch([16 * rank + i]) for i in range(per_epoch)])
    try:
        trainer.fit()
    finally:
        logging.getLogger("dream_trainer.trainer").removeHandler(handler)
    return {
        "seen": trainer.seen,
        "grads": capture.grads,
        "weights": capture.weights,
        "step": trainer.global_step,
        "warnings": records,
    }


PARTIAL = {
    "single-1-left": (1, None, 2, 3),
    "single-2-left": (1, None, 3, 5),
    "ddp-2-left": (2, DDP, 3, 5),
    "fsdp-2-left": (2, DeviceParameters.FSDP(), 3, 5),
}


@pytest.mark.parametrize(
    "world_size,params,accum,per_epoch",
    [pytest.param(*v, id=k) for k, v in PARTIAL.items()],
)
def test_an_unsized_loader_ending_mid_group_drops_the_partial_group(
    world_size, params, accum, per_epoch
):
    results = run_on_ranks(partial_group, world_size, params, accum, per_epoch)
    for result in results:
        assert result["step"] == 2  # one full group per epoch
        assert any("dropping" in w for w in result["warnings"]), result["warnings"]
    # Epoch 1's first step must use only its own first `accum` micro-batches on each rank.
    data, model = SequenceData(32), reference_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(results[0]["weights"][1][name])
    own = [ids for r in results for e, s, ids in r["seen"] if e == 1 and s == 1]
    assert len(own) == world_size * accum
    torch.stack([mean_loss(model, data.batch(ids)) for ids in own]).mean().backward()
    expected = full_grads(model)
    for rank, result in enumerate(results):
        assert_tensors_close(result["grads"][1], expected, 1e-6, f"rank {rank} epoch-1 grads")


# 7. Loop lengths


def test_max_steps_stops_exactly_there_across_epochs():
    # 4 micro-batches per rank per epoch, 2 per step: 2 steps per epoch.
    results = ok(
        run_on_ranks(
            run, 2, DDP, {}, dataset_size=16, n_epochs=5, max_steps=3, gradient_accumulation_steps=2
        )
    )
    for result in results:
        assert result["global_step"] == 3
        assert [e for e, _, _ in result["seen"]] == [0, 0, 0, 0, 1, 1]


def test_train_steps_per_epoch_limits_every_epoch():
    results = ok(
        run_on_ranks(run, 2, DDP, {}, dataset_size=16, n_epochs=2, train_steps_per_epoch=3)
    )
    for result in results:
        assert result["global_step"] == 6
        epochs = [[ids for e, _, ids in result["seen"] if e == epoch] for epoch in (0, 1)]
        assert len(epochs[0]) == 3 and epochs[1] == epochs[0]


def test_a_loader_shorter_than_one_accumulation_group_is_an_explained_error():
    results = run_on_ranks(run, 2, DDP, {}, dataset_size=8, gradient_accumulation_steps=4)
    for result in results:
        assert isinstance(result["error"], RuntimeError)
        message = str(result["error"])
        assert "yields 2 batches" in message
        assert "fewer than gradient_accumulation_steps=4" in message
        assert result["global_step"] == 0


VAL = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]


def validation_steps(result: dict[str, Any]) -> list[int]:
    return [event[2] for event in result["events"] if event[0] == "val" and event[1] == 0]


def test_val_every_n_steps_validates_on_those_steps_and_not_at_epoch_end():
    # 3 steps per epoch, 2 epochs: validations at steps 2, 4, 6 (6 is also an epoch end).
    results = ok(
        run_on_ranks(
            run, 2, DDP, {"val_batches": VAL}, dataset_size=12, n_epochs=2, val_every_n_steps=2
        )
    )
    for result in results:
        assert validation_steps(result) == [2, 4, 6]


def test_sanity_validation_runs_one_batch_before_training_without_logging():
    results = ok(
        run_on_ranks(run, 2, DDP, {"val_batches": VAL}, dataset_size=8, num_sanity_val_steps=1)
    )
    for result in results:
        kinds = [
            (e[0], e[1] if e[0] == "val" else None, e[2] if e[0] == "val" else e[1])
            for e in result["events"]
        ]
        assert kinds == [
            ("val", 0, 0),
            ("train", None, 0),
            ("train", None, 1),
            ("val", 0, 2),
            ("val", 1, 2),
            ("val", 2, 2),
        ]
        logged_values = [step for step, metrics in result["logged"] if "value" in metrics]
        assert logged_values == [2]


# 8. Validation reduction and modes


def test_validation_results_are_weighted_by_samples_across_ranks():
    # Rank 0: 6 samples in batches of 3; rank 1: 2 samples in batches of 1.
    per_rank = [
        [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])],
        [torch.tensor([10.0]), torch.tensor([20.0])],
    ]
    results = ok(
        run_on_ranks(
            run,
            2,
            DDP,
            {"val_batches": {"per_rank": per_rank}},
            dataset_size=8,
            val_every_n_steps=1,
        )
    )
    true_mean = 51.0 / 8  # the mean of rank means would be 9.25
    for result in results:
        assert result["validation_results"]["value"] == pytest.approx(true_mean, abs=1e-6)
        vals = [e for e in result["events"] if e[0] == "val"]
        trains = [e for e in result["events"] if e[0] == "train"]
        assert len(vals) == 4 and all(e[3:] == (False, False) for e in vals)
        # The 2nd step runs after the 1st validation, mid-epoch: back in train mode.
        assert [e[2] for e in trains] == [True, True]


# 9. Logged training loss


def test_logged_training_loss_is_the_mean_over_ranks_and_micro_batches():
    results = ok(run_on_ranks(run, 2, DDP, {}, dataset_size=16, gradient_accumulation_steps=2))
    for result in results:
        assert [step for step, _ in result["logged"]] == [1, 2]
    for step in range(2):
        per_rank = [sum(r["losses"][2 * step : 2 * step + 2]) / 2 for r in results]
        assert per_rank[0] != pytest.approx(per_rank[1], abs=1e-3), "ranks must see different data"
        for result in results:
            logged = result["logged"][step][1]
            assert logged["train/loss"] == pytest.approx(sum(per_rank) / 2, rel=1e-6, abs=0)
            assert logged["train/rank"] == 0.5
    for result in results:
        final = result["logged"][-1][1]
        assert result["last_train_metrics"] == {"loss": final["train/loss"], "rank": 0.5}
