"""The automatic layout: the decision table, its config forms, measuring models, and runs on ranks."""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dream_trainer.configs import (
    AutoLayout,
    DeviceParameters,
    LoggingParameters,
    TrainerConfig,
    apply_overrides,
)
from dream_trainer.world import DistributedWorld, MeshLayout, ModelSize, choose_layout, fake_world
from dream_trainer.world.auto_layout import (
    device_memory_bytes,
    format_bytes,
    format_count,
    model_size_from,
)
from tests.multirank import run_on_ranks
from tests.trainer_fixtures import MLPTrainer, RegressionData, caught, full_state, mlp_config

GiB = 2**30
# Llama 3 as examples/llama3 builds it on meta (size_of_models): parameters and the largest
# FSDP unit, the root's embedding and output (larger than one layer).
LLAMA_8B = ModelSize(8_030_261_248, 8_030_261_248, 4.0, 1_050_677_248)
LLAMA_70B = ModelSize(70_553_706_496, 70_553_706_496, 4.0, 2_101_354_496)
LLAMA_405B = ModelSize(405_853_388_800, 405_853_388_800, 4.0, 4_202_708_992)
ONE_B = ModelSize(10**9, 10**9)  # fp32, block not counted: states 14.9 GiB

# (world size, devices per node, device memory, model, auto options) -> (kind, degrees)
CASES: dict[str, tuple[int, int, int, ModelSize, dict[str, Any], str, dict[str, int]]] = {
    "1B on one 80GiB device": (1, 1, 80 * GiB, ONE_B, {}, "single device", {}),
    "1B on 4 x 80GiB: replicas": (4, 4, 80 * GiB, ONE_B, {}, "DDP", {"dp_replicate": 4}),
    "1B on 4 x 16GiB: sharded": (4, 4, 16 * GiB, ONE_B, {}, "FSDP", {"dp_shard": 4}),
    "1B on 3 x 16GiB: sharded": (3, 3, 16 * GiB, ONE_B, {}, "FSDP", {"dp_shard": 3}),
    "1B on 2 nodes of 8 x 16GiB: per node": (
        16, 8, 16 * GiB, ONE_B, {}, "HSDP", {"dp_replicate": 2, "dp_shard": 8}
    ),
    "1B, more reserve: sharded": (
        4, 4, 24 * GiB, ONE_B, {"activation_reserve": 0.5}, "FSDP", {"dp_shard": 4}
    ),
    "1B with SGD (no state): replicas": (
        4, 4, 16 * GiB, ONE_B, {"optimizer_bytes_per_parameter": 0}, "DDP", {"dp_replicate": 4}
    ),
    "8B on one node of 8": (8, 8, 80 * GiB, LLAMA_8B, {}, "FSDP", {"dp_shard": 8}),
    "8B on 8 nodes": (64, 8, 80 * GiB, LLAMA_8B, {}, "HSDP", {"dp_replicate": 8, "dp_shard": 8}),
    "70B on 64": (64, 8, 80 * GiB, LLAMA_70B, {}, "FSDP", {"dp_shard": 64}),
    "70B on 1024": (1024, 8, 80 * GiB, LLAMA_70B, {}, "FSDP", {"dp_shard": 1024}),
    "405B on 512, 40GiB activations": (
        512, 8, 80 * GiB, LLAMA_405B, {"activation_memory": 40 * GiB},
        "FSDP x TP", {"dp_shard": 256, "tensor_parallel": 2},
    ),
    "405B on 1024, 100GiB activations": (
        1024, 8, 80 * GiB, LLAMA_405B, {"activation_memory": 100 * GiB},
        "FSDP x TP", {"dp_shard": 256, "tensor_parallel": 4},
    ),
    "405B on 256": (256, 8, 80 * GiB, LLAMA_405B, {}, "FSDP", {"dp_shard": 256}),
    "8B on 8 nodes, 60GiB activations: TP keeps a node's share": (
        64, 8, 80 * GiB, LLAMA_8B, {"activation_memory": 60 * GiB},
        "HSDP x TP", {"dp_replicate": 8, "dp_shard": 4, "tensor_parallel": 2},
    ),
    "8B on 8 nodes, 100GiB activations: the smallest TP first": (
        64, 8, 80 * GiB, LLAMA_8B, {"activation_memory": 100 * GiB},
        "FSDP x TP", {"dp_shard": 32, "tensor_parallel": 2},
    ),
    "tiny budget, 2 nodes of 2: replicas of a TP pair": (
        4, 2, 1180, ModelSize(67, 67, 4.0, 80), {"param_dtype": None},
        "DDP x TP", {"dp_replicate": 2, "tensor_parallel": 2},
    ),
    "tiny budget, one node of 2: TP only": (
        2, 2, 1000, ModelSize(67, 67, 4.0, 40), {"param_dtype": None}, "TP", {"tensor_parallel": 2}
    ),
}  # fmt: skip


def auto(**options: Any) -> DeviceParameters:
    """An automatic layout computing in bf16 (stored in fp32), unless ``options`` say otherwise."""
    return DeviceParameters.auto(**{"param_dtype": "bfloat16", **options})


def expected_parameters(degrees: dict[str, int]) -> dict[str, int]:
    return {"dp_replicate": 1, "dp_shard": 1, "tensor_parallel": 1, **degrees}


@pytest.mark.parametrize("case", list(CASES))
def test_the_layout_for_each_world_and_model(case):
    world, per_node, memory, model, options, kind, degrees = CASES[case]
    choice = choose_layout(auto(**options), world, per_node, memory, model)
    assert choice.kind == kind, choice.describe()
    chosen = choice.device_parameters
    assert {k: chosen.degrees()[k] for k in ("dp_replicate", "dp_shard", "tensor_parallel")} == (
        expected_parameters(degrees)
    )
    assert chosen.auto_layout is None and chosen.param_dtype == auto(**options).param_dtype
    assert MeshLayout.resolve(chosen, world).world_size == world
    assert choice.fits and choice.per_device_bytes <= choice.budget_bytes
    assert choice.describe().startswith(f"auto layout: {kind} (")


@pytest.mark.parametrize(
    "case",
    [
        "8B on 8 nodes",
        "70B on 1024",
        "405B on 1024, 100GiB activations",
        "8B on 8 nodes, 60GiB activations: TP keeps a node's share",
    ],
)
def test_large_layouts_build_their_meshes_on_a_fake_world(case):
    world_size, per_node, memory, model, options, kind, degrees = CASES[case]
    params = auto(
        device_memory=memory,
        parameter_count=model.parameters,
        largest_block_parameters=model.largest_block,
        **options,
    )
    with fake_world(params, world_size, rank=world_size - 1, ranks_per_node=per_node) as world:
        assert world.layout_choice is not None and world.layout_choice.kind == kind
        want = expected_parameters(degrees)
        assert world.dp_replicate_size == want["dp_replicate"]
        assert world.dp_shard_size == want["dp_shard"]
        assert world.get_mesh("tp").size() == want["tensor_parallel"]
        assert world.dp_size * world.tp_size == world_size
        if kind == "HSDP":
            assert tuple(world.fsdp_config["mesh"].shape) == (
                want["dp_replicate"],
                want["dp_shard"],
            )
        assert world.device_parameters.auto_layout is None


def test_the_reason_names_the_numbers():
    choice = choose_layout(auto(), 4, 4, 16 * GiB, ONE_B)
    assert choice.describe() == (
        "auto layout: FSDP (dp_shard=4): model states 14.9 GiB (1B parameters x 4 bytes + 1B "
        "trainable x (4 + 8) bytes of gradient and optimizer state) do not fit one device's "
        "12.0 GiB budget; sharded over all 4 ranks: 3.7 GiB per device (budget: 16.0 GiB of "
        "device memory x (1 - activation_reserve 0.25); gathered blocks not counted: "
        "largest_block_parameters not given)"
    )
    tp = choose_layout(auto(activation_memory=40 * GiB), 512, 8, 80 * GiB, LLAMA_405B)
    assert "tensor parallelism of degree 2 within a node divides the gathered blocks" in tp.reason
    assert "- activations 40.0 GiB / 2" in tp.reason


def test_one_rank_that_does_not_fit_is_still_one_device_but_says_so():
    choice = choose_layout(auto(), 1, 1, 16 * GiB, ONE_B)
    assert choice.kind == "single device" and not choice.fits
    assert set(choice.device_parameters.degrees().values()) == {1}
    assert "do not fit one device's 12.0 GiB budget" in choice.reason


def test_frozen_parameters_need_no_gradients_or_optimizer_state():
    frozen = ModelSize(10**9, 10**8)  # a frozen 0.9B next to a trained 0.1B
    assert choose_layout(auto(), 4, 4, 16 * GiB, frozen).kind == "DDP"
    assert choose_layout(auto(), 4, 4, 16 * GiB, ONE_B).kind == "FSDP"


def test_when_nothing_fits_the_error_gives_the_numbers_and_the_fixes():
    with pytest.raises(ValueError) as info:
        choose_layout(auto(), 64, 8, 80 * GiB, LLAMA_405B)
    text = str(info.value)
    for fragment in (
        "auto layout: nothing fits on 64 ranks",
        "model states 5.9 TiB",
        "sharded over all 64 ranks: 94.5 GiB per device",
        "with tensor parallelism 8 (the most within a node)",
        "launch at least 112 ranks (with tensor parallelism 8)",
        "bytes_per_parameter and optimizer_bytes_per_parameter to match",
        "give the degrees yourself",
    ):
        assert fragment in text, fragment


def test_tensor_parallelism_is_only_chosen_where_it_can_apply():
    no_tp = auto(activation_memory=40 * GiB, allow_tensor_parallel=False)
    with pytest.raises(ValueError, match=r"not considered \(allow_tensor_parallel=False\)"):
        choose_layout(no_tp, 512, 8, 80 * GiB, LLAMA_405B)
    no_plan = ModelSize(**{**LLAMA_405B.__dict__, "tensor_parallel": False})
    with pytest.raises(ValueError, match="the model has no tensor-parallel plan"):
        choose_layout(auto(activation_memory=40 * GiB), 512, 8, 80 * GiB, no_plan)
    with pytest.raises(ValueError, match="no tensor-parallel degree divides the 1 devices"):
        choose_layout(auto(param_dtype=None), 2, 1, 1000, ModelSize(67, 67, 4.0, 40))


def test_uneven_nodes_are_refused():
    with pytest.raises(ValueError, match="6 ranks and 4 per node"):
        choose_layout(auto(), 6, 4, 80 * GiB, ONE_B)


# The config forms


def test_auto_takes_layout_options_and_other_fields():
    params = DeviceParameters.auto(
        device_memory="80GiB", activation_reserve=0.3, compile_model=True
    )
    assert params.auto_layout == AutoLayout(device_memory=80 * GiB, activation_reserve=0.3)
    assert params.compile_model and params.degrees()["dp_shard"] == "auto"
    assert AutoLayout(device_memory="80GB").device_memory == 80 * 10**9
    assert TrainerConfig(device_parameters="auto").device_parameters == DeviceParameters.auto()
    text = TrainerConfig(device_parameters=params).model_dump_json()
    assert TrainerConfig.model_validate_json(text).device_parameters == params


def test_auto_refuses_degrees_and_other_strings():
    with pytest.raises(ValueError, match="tensor_parallel=2 was given"):
        DeviceParameters.auto(tensor_parallel=2)
    with pytest.raises(ValueError, match="pipeline_parallel=2 was given"):
        DeviceParameters(pipeline_parallel=2, auto_layout={})
    with pytest.raises(ValueError, match=r"as the string 'fsdp'; .*, or the string 'auto'"):
        TrainerConfig(device_parameters="fsdp")
    with pytest.raises(ValueError, match="trainable_count=5 is larger than parameter_count=4"):
        AutoLayout(parameter_count=4, trainable_count=5)
    with pytest.raises(ValueError, match="largest_block_parameters=5 is larger"):
        AutoLayout(parameter_count=4, largest_block_parameters=5)
    with pytest.raises(ValueError, match="the world chooses their degrees when it launches"):
        MeshLayout.resolve(DeviceParameters.auto(), 8)


def test_the_command_line_turns_a_preset_into_auto_and_keeps_its_other_fields():
    base = TrainerConfig(
        device_parameters=DeviceParameters.FSDP(tensor_parallel=2, param_dtype="bf16")
    )
    config = apply_overrides(
        base,
        [
            "--device_parameters.auto_layout.device_memory",
            "40GiB",
            "--device_parameters",
            "auto",
            "--device_parameters.auto_layout.activation_reserve",
            "0.5",
        ],
    )
    params = config.device_parameters
    assert params.auto_layout == AutoLayout(device_memory=40 * GiB, activation_reserve=0.5)
    assert params.tensor_parallel == 1 and params.param_dtype is torch.bfloat16


def test_given_counts_replace_the_measurement():
    def measure() -> ModelSize:
        return ModelSize(100, 80, 2.0, 10, tensor_parallel=False)

    assert model_size_from(AutoLayout(parameter_count=50), measure) == ModelSize(50, 50, 4.0, 0)
    assert model_size_from(AutoLayout(trainable_count=0), measure) == ModelSize(
        100, 0, 2.0, 10, tensor_parallel=False
    )
    with pytest.raises(RuntimeError, match=r"DeviceParameters.auto\(parameter_count="):
        model_size_from(AutoLayout(), None)


def test_memory_is_the_ram_shared_by_the_ranks_of_a_node_on_the_cpu():
    whole = device_memory_bytes(torch.device("cpu"), 1)
    assert whole > 2**28 and device_memory_bytes(torch.device("cpu"), 4) == whole // 4
    assert (format_bytes(900), format_bytes(1536), format_bytes(3.2 * GiB)) == (
        "900 B",
        "1.5 KiB",
        "3.2 GiB",
    )
    assert (format_count(67), format_count(8_030_261_248)) == ("67", "8.03B")


def test_launching_logs_the_choice_and_warns_when_one_device_is_too_small(caplog):
    params = DeviceParameters.auto(parameter_count=10**9, device_memory="16GiB")
    with (
        caplog.at_level(logging.INFO, logger="dream_trainer.world"),
        DistributedWorld(params, device="cpu") as world,
    ):
        assert world.layout == MeshLayout() and world.layout_choice is not None
        assert world.device_parameters.auto_layout is None
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("auto layout: single device (every degree 1): one rank") for m in infos)
    assert any(
        "may not fit this one device (estimate 14.9 GiB, budget 12.0 GiB)" in m for m in warnings
    )


# Measuring a trainer's models


class TiedPair(nn.Module):
    """An embedding tied to the output, and two blocks (one frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.blocks[1].requires_grad_(False)


class TiedTrainer(MLPTrainer):
    def configure_models(self) -> None:
        self.model = TiedPair()
        self.alias = self.model.blocks  # an alias into the model: counted once


def test_measuring_counts_on_meta_and_forgets_the_models():
    trainer = TiedTrainer(mlp_config("auto"))
    size = trainer.measure_model_size()
    # 40 (tied, once) + 2 x 20; block 1 frozen; the root's own embedding (40) is the largest unit.
    assert size == ModelSize(80, 60, 4.0, 40, tensor_parallel=False)
    assert not hasattr(trainer, "model") and not hasattr(trainer, "alias")
    planned = MLPTrainer(mlp_config("auto", plan=True)).measure_model_size()
    assert planned == ModelSize(67, 67, 4.0, 40, tensor_parallel=True)


# The same script on 1, 2 and 3 ranks


class AutoTrainer(MLPTrainer):
    """Reads 12 samples in global batches of 6, however many ranks there are."""

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = RegressionData(12, seed=1)
        sampler = self.distributed_sampler(data, shuffle=False)
        return DataLoader(data, batch_size=self.batch_sizes.per_device, sampler=sampler), None

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def train_auto(device_parameters: Any, plan: bool = False) -> dict[str, Any]:
    config = mlp_config(
        device_parameters,
        LoggingParameters(backends=[], log_every_n_steps=1),
        training={"n_epochs": 2, "global_batch_size": 6},
        plan=plan,
    )
    trainer = AutoTrainer(config)
    trainer.losses = []
    trainer.fit()
    choice = trainer.world.layout_choice
    return {
        "kind": choice.kind if choice else None,
        "layout": trainer.world.layout,
        "per_device": trainer.batch_sizes.per_device,
        "losses": trainer.losses,
        "weights": full_state(trainer.model),
    }


@functools.cache
def one_process() -> dict[str, Any]:
    (result,) = run_on_ranks(train_auto, 1, "auto")
    assert (result["kind"], result["per_device"], len(result["losses"])) == ("single device", 6, 4)
    return result


# The MLP's states are 1072 bytes (67 parameters x 16) and its largest block 40 parameters: with
# 1200 bytes of memory (900 of budget) a replica does not fit but a shard over 2 or 3 ranks does;
# with 1000 (750) on 2 ranks only tensor parallelism, which halves the gathered blocks, does.
RUNS = {
    "auto on 2 ranks": (2, "auto", False, "DDP", MeshLayout(dp_replicate=2)),
    "auto on 3 ranks": (3, "auto", False, "DDP", MeshLayout(dp_replicate=3)),
    "small memory on 2 ranks": (
        2, DeviceParameters.auto(device_memory=1200), False, "FSDP", MeshLayout(dp_shard=2)
    ),
    "small memory on 3 ranks": (
        3, DeviceParameters.auto(device_memory=1200), False, "FSDP", MeshLayout(dp_shard=3)
    ),
    "smaller memory on 2 ranks": (
        2, DeviceParameters.auto(device_memory=1000), True, "TP", MeshLayout(tp=2)
    ),
}  # fmt: skip


@pytest.mark.parametrize("run", list(RUNS))
def test_the_same_trainer_chooses_its_layout_and_trains_like_one_process(run):
    ranks, params, plan, kind, layout = RUNS[run]
    reference = one_process()
    for rank, result in enumerate(run_on_ranks(train_auto, ranks, params, plan, timeout=300)):
        assert (result["kind"], result["layout"]) == (kind, layout)
        assert result["per_device"] == 6 // layout.size("dp")
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0
        )
        for name, value in result["weights"].items():
            torch.testing.assert_close(
                value, reference["weights"][name], rtol=0, atol=1e-6, msg=f"rank {rank} {name}"
            )


def launch_with_memory(memories: list[int]) -> dict[str, Any]:
    import torch.distributed as dist

    memory = memories[dist.get_rank()]
    params = DeviceParameters.auto(parameter_count=10**9, device_memory=memory)

    def launch() -> None:
        DistributedWorld(params, device="cpu").launch()

    return caught(launch)


def test_ranks_that_would_choose_different_layouts_fail_together():
    results = run_on_ranks(launch_with_memory, 2, [80 * GiB, 16 * GiB])
    for result in results:
        assert result["error"] == "RuntimeError"
        assert "chose different degrees on different ranks" in result["message"]
        assert "rank 1: degrees (1, 1, 2, 1, 1), device memory 16.0 GiB" in result["message"]
