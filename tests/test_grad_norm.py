"""total_grad_norm / clip_grads_by_total_norm_: the norm of the full gradients, whatever the layout.

Every case compares with the norm of the same full gradients in one process (plain torch).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from dream_trainer.parallel import apply_tensor_parallel
from dream_trainer.parallel.grad_norm import clip_grads_by_total_norm_, total_grad_norm
from tests.loop_fixtures import IN, reference_model
from tests.multirank import run_on_ranks

INF = math.inf


def make_grads(
    shapes: list[tuple[int, ...]], seed: int = 0, scale: float = 1.0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in shapes]


def expected_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> float:
    flat = torch.cat([g.flatten().double() for g in grads])
    return torch.linalg.vector_norm(flat, norm_type).item()


def dtensor_grad(param: torch.Tensor) -> DTensor:
    assert isinstance(param.grad, DTensor), "expected a DTensor gradient"
    return param.grad


def plain_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def param_with_grad(grad: torch.Tensor, mesh: Any = None, placements: Any = None) -> nn.Parameter:
    if mesh is None:
        param = nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        return param
    param = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, placements))
    param.grad = distribute_tensor(grad, mesh, placements)
    return param


# Plain tensors, one process (no collectives needed).


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_plain_tensor_norm_is_the_norm_of_all_gradients_together(norm_type):
    grads = make_grads([(3, 4), (5,), (2, 2, 2)])
    params = [param_with_grad(g) for g in grads]
    params.append(nn.Parameter(torch.ones(9)))  # no gradient: ignored
    norm = total_grad_norm(params, norm_type)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    assert norm.item() == pytest.approx(expected_norm(grads, norm_type), rel=1e-6)


def test_norm_and_clipping_never_synchronize_with_the_host():
    # On the meta device any .item()/bool()/float() would raise: passing proves no host sync.
    params = [nn.Parameter(torch.empty(4, 4, device="meta")) for _ in range(3)]
    for p in params:
        p.grad = torch.empty(4, 4, device="meta")
    norm = total_grad_norm(params)
    assert isinstance(norm, torch.Tensor) and norm.device.type == "meta" and norm.dim() == 0
    clip_grads_by_total_norm_(params, 1.0, norm)
    assert total_grad_norm(params, INF).device.type == "meta"


def test_other_norm_types_are_rejected():
    with pytest.raises(ValueError, match=r"norm_type must be 2\.0 or inf, got 1\.0"):
        total_grad_norm([param_with_grad(torch.ones(3))], 1.0)


def test_clipping_scales_large_gradients_to_max_norm():
    params = [param_with_grad(g) for g in make_grads([(3, 4), (5,)], scale=10.0)]
    norm = total_grad_norm(params)
    assert norm.item() > 10
    clip_grads_by_total_norm_(params, 0.5, norm)
    assert total_grad_norm(params).item() == pytest.approx(0.5, abs=1e-6)


def test_clipping_leaves_gradients_below_max_norm_untouched():
    grads = make_grads([(3, 4), (5,)], scale=0.01)
    params = [param_with_grad(g) for g in grads]
    norm = total_grad_norm(params)
    assert norm.item() < 1.0
    clip_grads_by_total_norm_(params, 1.0, norm)
    for p, g in zip(params, grads):
        assert p.grad is not None and torch.equal(p.grad, g)


# DTensor layouts on several ranks.

SHAPES = [(5, 3), (4, 6), (7,), (2, 3)]


def dtensor_norms(mesh_name: str, placements: list[list[Placement]]) -> dict[str, Any]:
    """Norms over gradients of SHAPES distributed with ``placements`` on a 2-rank mesh."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=(mesh_name,))
    grads = make_grads(SHAPES, scale=3.0)
    params = [param_with_grad(g, mesh, p) for g, p in zip(grads, placements)]
    out = {"l2": total_grad_norm(params).item(), "inf": total_grad_norm(params, INF).item()}
    clip_grads_by_total_norm_(params, 1.0, total_grad_norm(params))
    clipped = [dtensor_grad(p).full_tensor() for p in params]
    out["clipped_l2"] = expected_norm(clipped)
    return out


def check_dtensor_norms(results: list[dict[str, Any]]) -> None:
    grads = make_grads(SHAPES, scale=3.0)
    for rank, result in enumerate(results):
        assert result["l2"] == pytest.approx(expected_norm(grads), rel=1e-6), f"rank {rank}"
        assert result["inf"] == pytest.approx(expected_norm(grads, INF), rel=1e-6), f"rank {rank}"
        assert result["clipped_l2"] == pytest.approx(1.0, abs=1e-6), f"rank {rank}"


@pytest.mark.multirank
def test_fsdp_sharded_gradients_give_the_full_norm():
    # Shapes of odd length shard unevenly (3 + 2 rows).
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Shard(1)]]
    check_dtensor_norms(run_on_ranks(dtensor_norms, 2, "dp_shard", placements))


@pytest.mark.multirank
def test_tensor_parallel_norm_counts_replicated_gradients_once():
    # The (7,) gradient is replicated like a norm weight: each TP rank holds all of it.
    placements = [[Shard(0)], [Shard(1)], [Replicate()], [Replicate()]]
    check_dtensor_norms(run_on_ranks(dtensor_norms, 2, "tp", placements))


def fsdp_tp_model_norms() -> dict[str, Any]:
    """A TP-then-FSDP MLP on a (dp=2, tp=2) mesh after one backward on the same inputs."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = reference_model()
    apply_tensor_parallel(model, mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    params, named = list(model.parameters()), list(model.named_parameters())
    return {
        "placements": {n: [repr(p) for p in dtensor_grad(t).placements] for n, t in named},
        "meshes": {n: dtensor_grad(t).device_mesh.ndim for n, t in named},
        "l2": total_grad_norm(params).item(),
        "inf": total_grad_norm(params, INF).item(),
        "full_l2": expected_norm([dtensor_grad(p).full_tensor() for p in params]),
    }


@pytest.mark.multirank
def test_fsdp_times_tp_norm_equals_the_single_process_norm():
    results = run_on_ranks(fsdp_tp_model_norms, 4)
    model = reference_model()
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    grads = plain_grads(model)
    placements = results[0]["placements"]
    # The layout really mixes strided shards, plain shards and replicated TP dims.
    assert "_StridedShard" in " ".join(placements["fc1.weight"])
    assert placements["fc2.bias"][1] == "Replicate()"
    assert set(results[0]["meshes"].values()) == {2}
    for rank, result in enumerate(results):
        assert result["full_l2"] == pytest.approx(expected_norm(grads), rel=1e-5)
        assert result["l2"] == pytest.approx(expected_norm(grads), rel=1e-5), f"rank {rank}"
        assert result["inf"] == pytest.approx(expected_norm(grads, INF), rel=1e-5), f"rank {rank}"


def pipeline_stage_norms() -> dict[str, float]:
    """Two 'stages' with disjoint plain parameters summed over a 2-rank pp mesh."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    stage = mesh.get_local_rank()
    grads = make_grads(SHAPES, scale=2.0)
    mine = [param_with_grad(g) for i, g in enumerate(grads) if i % 2 == stage]
    return {
        "local": total_grad_norm(mine).item(),
        "l2": total_grad_norm(mine, extra_mesh=mesh).item(),
        "inf": total_grad_norm(mine, INF, extra_mesh=mesh).item(),
    }


@pytest.mark.multirank
def test_extra_mesh_sums_pipeline_stages_holding_different_parameters():
    results = run_on_ranks(pipeline_stage_norms, 2)
    grads = make_grads(SHAPES, scale=2.0)
    for stage, result in enumerate(results):
        assert result["local"] == pytest.approx(expected_norm(grads[stage::2]), rel=1e-6)
        assert result["l2"] == pytest.approx(expected_norm(grads), rel=1e-6)
        assert result["inf"] == pytest.approx(expected_norm(grads, INF), rel=1e-6)


def stage_without_gradients_norms() -> dict[str, float]:
    """Rank 1 holds parameters but no gradients (e.g. a stage that got none this step)."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    grads = make_grads(SHAPES, scale=2.0)
    mine = [param_with_grad(g) for g in grads]
    if mesh.get_local_rank() == 1:
        for param in mine:
            param.grad = None
    return {
        "l2": total_grad_norm(mine, extra_mesh=mesh).item(),
        "inf": total_grad_norm(mine, INF, extra_mesh=mesh).item(),
    }


@pytest.mark.multirank
def test_a_stage_without_gradients_still_gets_the_pipeline_norm():
    results = run_on_ranks(stage_without_gradients_norms, 2)
    grads = make_grads(SHAPES, scale=2.0)
    for result in results:
        assert result["l2"] == pytest.approx(expected_norm(grads), rel=1e-6)
        assert result["inf"] == pytest.approx(expected_norm(grads, INF), rel=1e-6)


def replicated_norms() -> dict[str, float]:
    """All gradients replicated DTensors (DDP's FSDP2-based replicate): nothing to reduce."""
    mesh = init_device_mesh("cpu", (2,))
    params = [param_with_grad(g, mesh, [Replicate()]) for g in make_grads(SHAPES)]
    out = {"l2": total_grad_norm(params).item(), "inf": total_grad_norm(params, INF).item()}
    clip_grads_by_total_norm_(params, 1.0, total_grad_norm(params))
    out["clipped"] = total_grad_norm(params).item()
    return out


@pytest.mark.multirank
def test_replicated_gradients_norm_and_clip_like_one_process():
    grads = make_grads(SHAPES)
    for result in run_on_ranks(replicated_norms, 2):
        assert result["l2"] == pytest.approx(expected_norm(grads), rel=1e-6)
        assert result["inf"] == pytest.approx(expected_norm(grads, INF), rel=1e-6)
        assert result["clipped"] == pytest.approx(1.0, rel=1e-5)


def test_clip_and_norm_in_one_pass_equals_the_two_steps():
    grads = make_grads(SHAPES, scale=3.0)
    one = [param_with_grad(g) for g in grads]
    two = [param_with_grad(g) for g in grads]
    from dream_trainer.parallel.grad_norm import clip_grads_and_norm_

    norm = clip_grads_and_norm_(one, 1.0)
    expected = total_grad_norm(two)
    clip_grads_by_total_norm_(two, 1.0, expected)
    assert norm.item() == expected.item() == pytest.approx(expected_norm(grads), rel=1e-6)
    for a, b in zip(one, two):
        assert torch.equal(a.grad, b.grad)
    unclipped = [param_with_grad(g) for g in grads]
    assert clip_grads_and_norm_(unclipped, None).item() == expected.item()
    assert all(torch.equal(p.grad, g) for p, g in zip(unclipped, grads))
