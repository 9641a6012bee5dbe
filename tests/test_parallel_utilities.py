"""load_full_weights and declared_blocks: the pieces behind layout-invariant initialization."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dream_trainer.parallel import apply_tensor_parallel, declared_blocks, load_full_weights
from dream_trainer.parallel.materialize import canonical_name
from tests.multirank import run_on_ranks
from tests.parity_model import TinyTransformer


def test_declared_blocks_are_children_of_module_lists_and_dicts():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.extra = nn.ModuleDict({"a": nn.ReLU()})
            self.head = nn.Linear(2, 2)

    model = Model()
    assert declared_blocks(model) == [model.layers[0], model.layers[1], model.extra["a"]]
    assert declared_blocks(nn.Linear(2, 2)) == []


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("layers.0._orig_mod.attention.wq.weight", "layers.0.attention.wq.weight"),
        ("_orig_mod.layers.1._checkpoint_wrapped_module.w", "layers.1.w"),
        ("module.head.bias", "head.bias"),
        ("head.bias", "head.bias"),
    ],
)
def test_canonical_name_drops_wrapper_levels(name, canonical):
    assert canonical_name(name) == canonical


def test_load_full_weights_names_a_missing_tensor():
    with pytest.raises(KeyError, match="full copy has no 'weight'"):
        load_full_weights(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


def shard_then_load(layout: str) -> dict[str, bool]:
    """Shard a fresh model, load a seeded full copy into it, compare full tensors."""
    torch.manual_seed(11)
    full = TinyTransformer(sequence_parallel=layout != "fsdp")
    full.init_weights()
    model = TinyTransformer(sequence_parallel=layout != "fsdp")  # different random values
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"], loss_parallel=True)
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    load_full_weights(model, full)
    reference = dict(full.named_parameters())
    out = {}
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor)
        out[name] = torch.equal(param.full_tensor(), reference[name].detach())
    return out


@pytest.mark.parametrize(("layout", "ranks"), [("fsdp", 2), ("fsdp_tp", 4)])
def test_load_full_weights_gives_every_layout_the_full_values(layout, ranks):
    for result in run_on_ranks(shard_then_load, ranks, layout):
        assert result and all(result.values()), [n for n, ok in result.items() if not ok]
