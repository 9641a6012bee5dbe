"""The fsdp2-utils / parallelism-guide call forms of dream_trainer.parallel, on a fake world."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel.style import PrepareModuleInput, SequenceParallel

from dream_trainer.configs import DeviceParameters
from dream_trainer.parallel import (
    FullyShard,
    ParallelPlan,
    apply_fully_shard,
    apply_tensor_parallel,
    colwise_parallel,
    fully_shard,
    parameter_parallel,
    prepare_module,
    rowwise_parallel,
    sequence_parallel,
)
from dream_trainer.world import fake_world

# ------------------------------------------------------------------------- fully_shard


def test_fully_shard_of_a_module_list_shards_each_child_and_not_the_list():
    with fake_world(DeviceParameters.FSDP(), 2) as world:
        layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        assert fully_shard(layers, **world.fsdp_config) is layers
        assert all(isinstance(layer, FSDPModule) for layer in layers)
        assert not isinstance(layers, FSDPModule)
        # A second call leaves the sharded children alone instead of wrapping them twice.
        fully_shard(layers, **world.fsdp_config)
        dicts = nn.ModuleDict({"a": nn.Linear(4, 4)})
        fully_shard(dicts, **world.fsdp_config)
        assert isinstance(dicts["a"], FSDPModule)


def test_the_fsdp_config_combines_with_an_explicit_reshard_after_forward():
    with fake_world(DeviceParameters.FSDP(), 2) as world:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fully_shard(model[0], **world.fsdp_config)
        fully_shard(model, **world.fsdp_config, reshard_after_forward=False)
        assert isinstance(model, FSDPModule)


def _resharded_after_forward(module: nn.Linear) -> bool:
    module(torch.randn(2, 4))
    return isinstance(module.weight, DTensor)


def test_pipeline_parallel_keeps_every_fsdp_module_gathered_after_forward():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

        def fully_shard(self, config: dict[str, Any]) -> None:
            fully_shard(self.proj, **config, reshard_after_forward=True)

    with fake_world(DeviceParameters.FSDP(), 2) as world:
        plain, piped = Block(), Block()
        apply_fully_shard(plain, world.fsdp_config)
        apply_fully_shard(piped, world.fsdp_config, pp_enabled=True)
        assert _resharded_after_forward(plain.proj)
        assert not _resharded_after_forward(piped.proj)


def test_a_module_naming_fully_shard_as_a_base_without_the_method_is_sharded_whole():
    class Head(nn.Linear, FullyShard):
        pass

    with fake_world(DeviceParameters.FSDP(), 2) as world:
        head = Head(4, 4)
        assert isinstance(head, FullyShard)
        apply_fully_shard(head, world.fsdp_config)
        assert isinstance(head, FSDPModule)


def test_structural_protocols_need_no_base():
    class Sharded(nn.Module):
        def fully_shard(self, config: dict[str, Any]) -> None: ...

    class Planned(nn.Module):
        def parallel_plan(self, loss_parallel: bool) -> dict[str, Any]:
            return {}

    assert isinstance(Sharded(), FullyShard) and not isinstance(Sharded(), ParallelPlan)
    assert isinstance(Planned(), ParallelPlan) and not isinstance(Planned(), FullyShard)
    assert not isinstance(nn.Linear(2, 2), (FullyShard, ParallelPlan))


# ---------------------------------------------------------------------------- plans


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 8, bias=False)
        self.down = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


def _placements(module: nn.Linear) -> tuple[Any, ...]:
    assert isinstance(module.weight, DTensor)
    return tuple(module.weight.placements)


def test_the_guides_parallel_plan_name_and_tuple_plans_are_applied():
    class GuidePair(Pair, ParallelPlan):
        def parallel_plan(self, loss_parallel: bool):
            return ({"up": colwise_parallel(self.up)}, {"down": rowwise_parallel(self.down)})

    with fake_world(DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), 2) as world:
        model = GuidePair()
        apply_tensor_parallel(model, world.get_mesh("tp"))
        assert _placements(model.up) == (Shard(0),)
        assert _placements(model.down) == (Shard(1),)


def test_a_tuple_plan_is_resolved_whole_before_anything_is_applied():
    class Broken(Pair):
        def parallelize_plan(self, loss_parallel: bool):
            return ({"up": colwise_parallel()}, {"dwn": rowwise_parallel()})

    with fake_world(DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), 2) as world:
        model = Broken()
        with pytest.raises(KeyError, match=r"Broken\.parallelize_plan\(\) has the key 'dwn'"):
            apply_tensor_parallel(model, world.get_mesh("tp"))
        assert not isinstance(model.up.weight, DTensor)


def test_an_explicit_parallel_plan_base_without_a_plan_method_is_an_error():
    class Empty(Pair, ParallelPlan):
        pass

    class Both(Pair):
        def parallel_plan(self, loss_parallel: bool) -> dict[str, Any]:
            return {}

        def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
            return {}

    with fake_world(DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), 2) as world:
        with pytest.raises(TypeError, match=r"neither parallel_plan.*nor parallelize_plan"):
            apply_tensor_parallel(Empty(), world.get_mesh("tp"))
        with pytest.raises(TypeError, match="defines both parallelize_plan and parallel_plan"):
            apply_tensor_parallel(Both(), world.get_mesh("tp"))


# ----------------------------------------------------------------------- style helpers


def test_style_helpers_take_their_target_module_first_as_fsdp2_utils_does():
    linear = nn.Linear(4, 4)
    assert colwise_parallel(linear)(linear).__class__.__name__ == "ColwiseParallel"
    assert rowwise_parallel(linear, output_layouts=Shard(1))(linear).output_layouts == (Shard(1),)
    with pytest.raises(TypeError, match=r"colwise_parallel\(\) takes the module it targets"):
        colwise_parallel(Shard(1))  # type: ignore[arg-type]


def test_sequence_parallel_accepts_input_and_output_layouts():
    norm = nn.RMSNorm(4)
    assert isinstance(sequence_parallel(norm)(norm), SequenceParallel)
    composed = sequence_parallel(norm, input_layouts=Replicate(), output_layouts=Replicate())(norm)
    kinds = [type(s).__name__ for s in composed.styles]  # type: ignore[attr-defined]
    assert kinds == ["PrepareModuleInput", "SequenceParallel", "PrepareModuleOutput"]
    prepare = composed.styles[0]  # type: ignore[attr-defined]
    assert isinstance(prepare, PrepareModuleInput)
    assert prepare.desired_input_layouts == (Shard(1),)


def test_sequence_parallel_with_layouts_runs_on_replicated_input():
    with fake_world(DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), 2) as world:

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.norm = nn.LayerNorm(4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.norm(x)

            def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
                layouts = dict(input_layouts=Replicate(), output_layouts=Replicate())
                return {"norm": sequence_parallel(self.norm, use_local_output=True, **layouts)}

        model = Model()
        apply_tensor_parallel(model, world.get_mesh("tp"))
        out = model(torch.randn(2, 6, 4))
        assert type(out) is torch.Tensor and out.shape == (2, 6, 4)


def test_prepare_module_accepts_the_fsdp2_utils_spellings_but_not_both_at_once():
    kwargs = dict(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),))
    style = prepare_module(use_local_output_for_output=False, **kwargs)
    assert style.kwargs["use_local_output"] is False  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="use_local_input=True and use_local_output_for_input"):
        prepare_module(use_local_input=True, use_local_output_for_input=False, **kwargs)


def test_parameter_parallel_replicates_by_default():
    assert parameter_parallel().placements == (Replicate(),)
    assert parameter_parallel(Shard(0)).placements == (Shard(0),)


# ------------------------------------------------------------------------ HSDP default


def test_hsdp_without_arguments_shards_within_a_node_and_replicates_across_nodes():
    from dream_trainer.world import MeshLayout

    params = DeviceParameters.HSDP()
    assert params.dp_shard == "node" and params.dp_replicate == "auto"
    layout = MeshLayout.resolve(params, world_size=16, ranks_per_node=8)
    assert (layout.dp_replicate, layout.dp_shard) == (2, 8)
    with_tp = MeshLayout.resolve(DeviceParameters.HSDP(tensor_parallel=2), 16, ranks_per_node=8)
    assert (with_tp.dp_replicate, with_tp.dp_shard, with_tp.tp) == (2, 4, 2)
    with pytest.raises(ValueError, match="dp_shard='node' shards over the 8 ranks"):
        MeshLayout.resolve(DeviceParameters.HSDP(tensor_parallel=3), 24, ranks_per_node=8)
    with pytest.raises(ValueError, match="positive integer or 'auto', got 'node'"):
        DeviceParameters(tensor_parallel="node")
