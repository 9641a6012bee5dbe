"""Options that must never be silently dropped: precision/offload without DP, aliases in init."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, TensorDataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, TrainingParameters, apply_overrides
from dream_trainer.trainer import Callback
from tests.multirank import run_on_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class SmallTrainer(DreamTrainer):
    def configure_models(self) -> None:
        self.model = Net()
        self.head = self.model.head  # an alias, not a second model

    def init_weights(self) -> None:
        nn.init.constant_(self.model.body.weight, 0.25)
        nn.init.zeros_(self.model.body.bias)
        nn.init.constant_(self.head.weight, 0.5)  # written through the alias
        nn.init.zeros_(self.head.bias)

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = TensorDataset(torch.ones(8, 4), torch.ones(8, 1))
        return DataLoader(data, batch_size=2, sampler=self.distributed_sampler(data)), None

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        out = self.model(x)
        self.observed_dtype = out.dtype  # FSDP's policy leaves the output in param_dtype
        loss = ((out.float() - y) ** 2).mean()
        self.backward(loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}


def config(params: DeviceParameters, **training: Any) -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=1, **training),
        logging_parameters={"backends": []},
    )


class InitialWeights(Callback[SmallTrainer]):
    def post_setup(self) -> None:
        self.weights = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in self.trainer.model.named_parameters()
        }


def fit_and_report(params: DeviceParameters) -> dict[str, Any]:
    initial = InitialWeights()
    trainer = SmallTrainer(config(params), callbacks=[initial])
    trainer.fit()
    return {
        "fsdp": isinstance(trainer.model, FSDPModule),
        "dtype": trainer.observed_dtype,
        "models": list(trainer.named_models()),
        "initial_head": initial.weights["head.weight"],
        "param_device": next(trainer.model.parameters()).device.type,
    }


def test_mixed_precision_on_one_device_is_applied_not_dropped():
    (result,) = run_on_ranks(
        fit_and_report, 1, DeviceParameters.SINGLE_DEVICE(param_dtype="bfloat16")
    )
    assert result["fsdp"] and result["dtype"] == torch.bfloat16


def test_full_precision_on_one_device_adds_no_wrapper():
    (result,) = run_on_ranks(fit_and_report, 1, DeviceParameters.SINGLE_DEVICE())
    assert not result["fsdp"] and result["dtype"] == torch.float32


def test_cpu_offload_with_tensor_parallel_only_is_applied():
    params = DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2, cpu_offload=True)

    results = run_on_ranks(fit_tp_offload, 2, params)
    assert all(r["fsdp"] and r["offload"] for r in results)


def fit_tp_offload(params: DeviceParameters) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    class TPTrainer(SmallTrainer):
        def apply_tensor_parallel(self, tp_mesh: Any) -> None:
            parallelize_module(
                self.model, tp_mesh, {"body": ColwiseParallel(), "head": RowwiseParallel()}
            )

    trainer = TPTrainer(config(params))
    trainer.fit()
    state = trainer.model._get_fsdp_state()
    group = state._fsdp_param_group
    return {
        "fsdp": isinstance(trainer.model, FSDPModule),
        "offload": type(group.offload_policy).__name__ == "CPUOffloadPolicy",
    }


@pytest.mark.parametrize(
    ("world_size", "params"),
    [
        (1, DeviceParameters.SINGLE_DEVICE()),
        (2, DeviceParameters.FSDP()),
        (2, DeviceParameters.DDP()),
    ],
)
def test_init_weights_through_an_alias_reaches_the_trained_model(world_size, params):
    for result in run_on_ranks(fit_and_report, world_size, params):
        assert result["models"] == ["model"]
        assert torch.equal(result["initial_head"], torch.full((1, 4), 0.5))


def test_callback_of_any_trainer_attaches():
    class Anything(Callback[Any]):
        pass

    trainer = SmallTrainer(config(DeviceParameters.SINGLE_DEVICE()), callbacks=[Anything()])
    assert trainer.callbacks.keys() == [Anything.__qualname__]


def test_state_dict_carries_the_rng_state():
    trainer = SmallTrainer(config(DeviceParameters.SINGLE_DEVICE()))
    trainer.world.launch()
    try:
        torch.manual_seed(5)
        state = trainer.state_dict()
        expected = torch.rand(3)
        torch.manual_seed(99)
        trainer.load_state_dict(state)
        assert torch.equal(torch.rand(3), expected)
    finally:
        trainer.world.destroy()


def test_command_line_guide_forms_replace_the_canonical_values():
    base = config(DeviceParameters.FSDP(dp_shard=4))
    new = apply_overrides(base, ["--device_parameters.tensor_parallel_size", "2"])
    assert new.device_parameters.tensor_parallel == 2
    ddp = apply_overrides(
        base,
        [
            "--device_parameters.data_parallel_size",
            "4",
            "--device_parameters.fsdp_config",
            '{"sharding_strategy": "NO_SHARD"}',
        ],
    )
    assert (ddp.device_parameters.dp_replicate, ddp.device_parameters.dp_shard) == (4, 1)
