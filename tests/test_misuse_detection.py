"""Launch mistakes caught early: missing rendezvous variables, idle accelerators, device_map."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dream_trainer.configs import DeviceParameters
from dream_trainer.trainer.checks import check_one_device_per_model
from dream_trainer.world import DistributedWorld, distributed_world, launch_checks
from dream_trainer.world.environment import LaunchEnvironment, visible_accelerators
from tests.test_warnings_and_conventions import recorded_warnings
from tests.trainer_fixtures import MLP, MLPTrainer, mlp_config

# Missing MASTER_ADDR / MASTER_PORT


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "MASTER_ADDR and MASTER_PORT are not"),
        ({"MASTER_ADDR": "node0"}, "MASTER_PORT is not"),
        ({"MASTER_PORT": "29500"}, "MASTER_ADDR is not"),
    ],
)
def test_ranks_without_a_master_address_name_the_missing_variables(given, missing):
    with pytest.raises(RuntimeError, match=missing) as caught:
        LaunchEnvironment.detect({"RANK": "1", "WORLD_SIZE": "4", **given})
    message = str(caught.value)
    assert "RANK=1 and WORLD_SIZE=4 are set" in message
    assert "dream-trainer run SCRIPT" in message and "torchrun" in message


def test_a_world_of_one_needs_no_master_address():
    env = LaunchEnvironment.detect({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_the_master_address_is_read_not_invented():
    env = LaunchEnvironment.detect(
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node3", "MASTER_PORT": "4242"}
    )
    assert (env.source, env.master_addr, env.master_port) == ("torchrun", "node3", 4242)


# Several accelerators, one process


def test_visible_accelerators_on_this_machine():
    kind, count = visible_accelerators()
    assert count == torch.cuda.device_count() or kind != "cuda"
    assert (kind == "cpu") == (count == 0)


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    with recorded_warnings() as messages:
        yield messages


def _launch_one_process(device: str | None) -> None:
    single = LaunchEnvironment(
        rank=0, world_size=1, local_rank=0, local_world_size=1, source="single"
    )
    with DistributedWorld(DeviceParameters.SINGLE_DEVICE(), device=device, environment=single):
        pass


def test_one_process_with_several_accelerators_warns_once_with_the_command(
    monkeypatch, warnings_logged
):
    monkeypatch.setattr(launch_checks, "visible_accelerators", lambda: ("cuda", 4))
    monkeypatch.setattr(distributed_world, "pick_device", lambda *_: torch.device("cpu"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "debug"])
    _launch_one_process(device=None)
    idle = [m for m in warnings_logged if "devices are visible" in m]
    assert len(idle) == 1, warnings_logged
    assert "4 cuda devices are visible but this run has 1 process" in idle[0]
    assert "`dream-trainer run train.py --config debug`" in idle[0]
    assert "torchrun --standalone --nproc_per_node=4 train.py --config debug" in idle[0]
    assert 'device="cuda:0"' in idle[0] and "CUDA_VISIBLE_DEVICES" in idle[0]


@pytest.mark.parametrize("forced", ["cpu", "cuda:0"])
def test_a_forced_device_means_one_device_on_purpose(monkeypatch, warnings_logged, forced):
    monkeypatch.setattr(launch_checks, "visible_accelerators", lambda: ("cuda", 4))
    monkeypatch.setattr(distributed_world, "pick_device", lambda *_: torch.device("cpu"))
    _launch_one_process(device=forced)
    assert not [m for m in warnings_logged if "devices are visible" in m]


def test_one_accelerator_and_one_process_is_not_a_mistake(monkeypatch, warnings_logged):
    monkeypatch.setattr(launch_checks, "visible_accelerators", lambda: ("cuda", 1))
    monkeypatch.setattr(distributed_world, "pick_device", lambda *_: torch.device("cpu"))
    _launch_one_process(device=None)
    assert not [m for m in warnings_logged if "devices are visible" in m]


# A model spread over several devices inside one rank (device_map="auto")


def spread_mlp() -> MLP:
    """An MLP whose layers sit on cuda:0 and cuda:1, as device_map="auto" leaves them.

    Fake tensors carry a CUDA device without a GPU; nothing here computes with them.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = MLP().to("meta")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for index, layer in enumerate(model.layers):
            layer.weight = nn.Parameter(torch.empty(layer.weight.shape, device=f"cuda:{index}"))
            layer.bias = nn.Parameter(torch.empty(layer.bias.shape, device=f"cuda:{index}"))
    return model


def test_a_model_on_two_devices_in_a_multi_rank_run_is_refused():
    with pytest.raises(RuntimeError) as caught:
        check_one_device_per_model({"model": spread_mlp()}, world_size=2)
    message = str(caught.value)
    assert "model 'model' (MLP) has its parameters on 2 devices" in message
    assert "cuda:0 (2 parameters), cuda:1 (2 parameters)" in message
    assert "this run has 2 ranks" in message and "tensor_parallel" in message


def test_one_device_or_meta_or_one_rank_is_fine():
    check_one_device_per_model({"model": spread_mlp()}, world_size=1)
    check_one_device_per_model({"model": MLP()}, world_size=8)  # all on the CPU
    half_built = MLP()
    half_built.layers[0].to("meta")  # meta is no placement
    check_one_device_per_model({"model": half_built}, world_size=8)


class SpreadMLPTrainer(MLPTrainer):
    def configure_models(self) -> None:
        self.model = spread_mlp()


def test_the_trainer_refuses_a_spread_model_before_parallelizing_it(monkeypatch, tmp_path):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # A fake 2-rank process group in this process: the trainer adopts it, nothing is sent.
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    called: list[Any] = []
    monkeypatch.setattr(SpreadMLPTrainer, "_parallelize_parts", lambda *a: called.append(a))
    try:
        # weight_init="sharded": no deep copy of the fake tensors before the check.
        config = mlp_config(DeviceParameters.DDP(), weight_init="sharded", run_dir=str(tmp_path))
        trainer = SpreadMLPTrainer(config, device="cpu")
        with pytest.raises(RuntimeError, match=r"'model' \(MLP\) has its parameters on 2 devices"):
            trainer.fit()
    finally:
        dist.destroy_process_group()
    assert not called
