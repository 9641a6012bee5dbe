"""Batch sizes: global = per device x data-parallel ranks x accumulation, any two give the third."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from torch.utils.data import DataLoader

from dream_trainer.configs import (
    BatchSizes,
    LoggingParameters,
    TrainingParameters,
    apply_overrides,
    resolve_batch_sizes,
)
from tests.trainer_fixtures import MLPTrainer, RegressionData, mlp_config

# (dp, micro, global, accumulation) -> (per device, accumulation, global)
RESOLVED = [
    ((4, 2, None, 3), (2, 3, 24)),  # no global: the product
    ((4, None, None, 1), (None, 1, None)),  # nothing given: the loaders decide
    ((4, None, 32, 2), (4, 2, 32)),  # global and accumulation: the micro-batch
    ((4, 2, 32, 1), (2, 4, 32)),  # global and micro-batch: the accumulation
    ((4, 2, 32, 4), (2, 4, 32)),  # all three, consistent
    ((3, None, 6, 1), (2, 1, 6)),
]


@pytest.mark.parametrize(("given", "resolved"), RESOLVED)
def test_the_missing_size_is_derived(given, resolved):
    dp, micro, total, accumulation = given
    sizes = resolve_batch_sizes(dp, micro, total, accumulation)
    assert (sizes.per_device, sizes.accumulation, sizes.global_batch, sizes.dp) == (*resolved, dp)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ((4, None, 30, 1), "global_batch_size=30 does not split evenly over 4 data-parallel ranks"),
        ((4, 2, 36, 1), "global_batch_size=36 is not a multiple of micro_batch_size=2 x 4"),
        ((4, 2, 32, 2), "is not micro_batch_size=2 x 4 data-parallel ranks x "),
    ],
)
def test_sizes_that_do_not_divide_name_the_numbers(given, message):
    with pytest.raises(ValueError, match=message):
        resolve_batch_sizes(*given)


def test_what_no_number_of_ranks_can_fix_fails_in_the_config():
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple of micro_batch"):
        TrainingParameters(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="micro_batch_size=2 x gradient_accumulation_steps=2 = 4"):
        TrainingParameters(global_batch_size=6, micro_batch_size=2, gradient_accumulation_steps=2)
    params = TrainingParameters(global_batch_size=12, gradient_accumulation_steps=3)
    assert params.batch_sizes(2) == BatchSizes(2, 2, 3, 12)
    assert BatchSizes(2, 4, 1, 8).describe() == (
        "batch sizes: 2 per device x 4 data-parallel ranks x 1 accumulation step = 8 global"
    )


class GlobalBatchTrainer(MLPTrainer):
    loader_off_by = 0

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = RegressionData(16, seed=1)
        per_device = self.batch_sizes.per_device + self.loader_off_by
        return DataLoader(data, batch_size=per_device, sampler=self.distributed_sampler(data)), None


class WrongLoaderTrainer(GlobalBatchTrainer):
    loader_off_by = 1


def global_batch_config() -> Any:
    return mlp_config(
        None,
        LoggingParameters(backends=[], log_every_n_steps=1),
        training={"n_epochs": 1, "global_batch_size": 8, "micro_batch_size": 2},
    )


def test_the_trainer_derives_the_accumulation_and_logs_the_sizes(caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = global_batch_config()
    trainer = GlobalBatchTrainer(config, device="cpu")
    with caplog.at_level(logging.INFO, logger="dream_trainer.trainer"):
        trainer.fit()
    assert trainer.batch_sizes == BatchSizes(2, 1, 4, 8)
    assert trainer.config.training_parameters.gradient_accumulation_steps == 4
    assert trainer.global_step == 2  # 16 samples, 8 per step
    assert config.training_parameters.gradient_accumulation_steps == 1  # the caller's is kept
    assert "batch sizes: 2 per device x 1 data-parallel rank x 4 accumulation steps = 8 global" in (
        caplog.messages
    )


def test_a_loader_with_another_batch_size_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = WrongLoaderTrainer(global_batch_config(), device="cpu")
    with pytest.raises(ValueError, match="the train loader's batch_size is 3, but training_param"):
        trainer.fit()


def test_the_llama_example_takes_a_global_batch_and_keeps_batch_size_per_rank():
    from examples.llama3.presets import preset
    from examples.llama3.train import Llama3Config, Llama3Trainer

    debug = preset("debug", Llama3Config)  # batch_size 8 per rank
    config = apply_overrides(debug, ["--training_parameters.global_batch_size", "32"])
    assert Llama3Trainer(config).resolve_batch_sizes(2) == BatchSizes(8, 2, 2, 32)
    assert Llama3Trainer(debug).resolve_batch_sizes(2) == BatchSizes(8, 2, 1, 16)
    smaller = apply_overrides(config, ["--batch_size", "4"])
    assert Llama3Trainer(smaller).resolve_batch_sizes(2) == BatchSizes(4, 2, 4, 32)
    with pytest.raises(ValueError, match="this example takes it from batch_size"):
        apply_overrides(debug, ["--training_parameters.micro_batch_size", "4"])
