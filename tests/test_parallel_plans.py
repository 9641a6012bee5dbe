"""Tests of the declarative parallel-plan API (dream_trainer.parallel) on gloo CPU ranks."""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx
from torch.distributed.tensor.parallel.style import PrepareModuleInput, RowwiseParallel

from dream_trainer.parallel import (
    FullyShard,
    ParallelPlan,
    PlanKeyError,
    apply_fully_shard,
    apply_tensor_parallel,
    colwise_parallel,
    parameter_parallel,
    prepare_module,
    prepare_module_input,
    rowwise_parallel,
    sequence_parallel,
)
from dream_trainer.parallel import styles as styles_mod
from tests.multirank import run_on_ranks

DIM, HEADS, HIDDEN, VOCAB, SEQ, LAYERS = 16, 4, 32, 32, 8, 2
Layout = dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]  # name -> (placements, local shape)

# ------------------------------------------------------------------------------ model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under TP each rank holds HEADS / tp heads.
        q, k, v = (
            w(x).view(b, s, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FSDPUnit(nn.Module):
    """Implements the FullyShard protocol by wrapping itself with FSDP2."""

    def fully_shard(self, config: dict[str, Any]) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self, **config)


class Block(FSDPUnit):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(DIM), RMSNorm(DIM)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        seq_to_full: dict[str, Any] = dict(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
        return {
            "attention": prepare_module_input(**seq_to_full),
            "attention.w[qkv]": colwise_parallel(),
            "attention.wo": rowwise_parallel(output_layouts=Shard(1)),
            "feed_forward": prepare_module_input(**seq_to_full),
            "feed_forward.w1": colwise_parallel(),
            "feed_forward.w3": colwise_parallel(),
            "feed_forward.w2": rowwise_parallel(output_layouts=Shard(1)),
        }


class Head(nn.Module):
    """Output projection as a bare parameter used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, DIM) * DIM**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        return {
            "": prepare_module(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                output_layouts=(Shard(-1),),
                desired_output_layouts=(Shard(-1) if loss_parallel else Replicate(),),
                use_local_output=not loss_parallel,
            ),
            "weight": parameter_parallel([Shard(0)]),
        }


class TinyTransformer(FSDPUnit):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.output = Head()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        return {
            "tok_embeddings": rowwise_parallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "layers.*.attention_norm": sequence_parallel(),
            "layers.*.ffn_norm": sequence_parallel(),
            "norm": sequence_parallel(),
        }


def expected_tp_layout(tp: int) -> Layout:
    """The layout apply_tensor_parallel must produce on tp ranks."""
    colwise = ((Shard(0),), (DIM // tp, DIM))
    layout: Layout = {
        "tok_embeddings.weight": ((Shard(0),), (VOCAB // tp, DIM)),  # rowwise embedding: vocab
        "norm.weight": ((Replicate(),), (DIM,)),
        "output.weight": ((Shard(0),), (VOCAB // tp, DIM)),
    }
    for i in range(LAYERS):
        p = f"layers.{i}."
        layout |= {
            p + "attention_norm.weight": ((Replicate(),), (DIM,)),
            p + "ffn_norm.weight": ((Replicate(),), (DIM,)),
            p + "attention.wq.weight": colwise,
            p + "attention.wk.weight": colwise,
            p + "attention.wv.weight": colwise,
            p + "attention.wo.weight": ((Shard(1),), (DIM, DIM // tp)),
            p + "feed_forward.w1.weight": ((Shard(0),), (HIDDEN // tp, DIM)),
            p + "feed_forward.w3.weight": ((Shard(0),), (HIDDEN // tp, DIM)),
            p + "feed_forward.w2.weight": ((Shard(1),), (DIM, HIDDEN // tp)),
        }
    return layout


# ------------------------------------------------------------------- rank functions


def _layout_of(model: nn.Module) -> Layout:
    out = {}
    for name, param in model.named_parameters():
        assert isinstance(param, nn.Parameter) and isinstance(param.data, DTensor), name
        dtensor = cast(DTensor, param)
        out[name] = (tuple(dtensor.placements), tuple(dtensor.to_local().shape))
    return out


def tp_layout_on_ranks(meta_and_compiled: bool) -> Layout:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    with torch.device("meta" if meta_and_compiled else "cpu"):
        model: nn.Module = TinyTransformer()
    if meta_and_compiled:  # wrappers are only constructed: compiling on CPU is slow
        layers = cast(nn.ModuleList, model.layers)
        layers[0] = cast(nn.Module, torch.compile(layers[0]))
        model = cast(nn.Module, torch.compile(model))
    assert apply_tensor_parallel(model, mesh["tp"], loss_parallel=True) is model
    layout = _layout_of(model)
    return {name.replace("_orig_mod.", ""): value for name, value in layout.items()}


def fsdp_layout_on_ranks() -> Layout:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = apply_fully_shard(TinyTransformer(), {"mesh": mesh})
    assert all(cast(DTensor, p).device_mesh == mesh for p in model.parameters())
    return _layout_of(model)


def _batches(steps: int, batch: int) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (steps, batch, SEQ + 1), generator=torch.Generator().manual_seed(1)
    )


def _train(
    model: nn.Module, tokens: torch.Tensor, loss_parallel: bool, dp_mesh: DeviceMesh | None
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in tokens:
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with loss_parallel_ctx() if loss_parallel else torch.enable_grad():
            logits = model(inputs)
            assert isinstance(logits, DTensor) == loss_parallel
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.full_tensor() if isinstance(loss, DTensor) else loss.detach()
        if dp_mesh is not None:
            dist.all_reduce(value, group=dp_mesh.get_group())
            value = value / dp_mesh.size()
        losses.append(value.item())
    return losses


def parity_on_ranks(mode: str, steps: int = 3) -> dict[str, Any]:
    """Train the same seeded model single-process and with `mode`; return losses and weight diffs."""
    torch.manual_seed(0)
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = _batches(steps, batch=4)
    ref_losses = _train(reference, tokens, loss_parallel=False, dp_mesh=None)

    world = dist.get_world_size()
    dp_mesh = tp_mesh = None
    if mode == "fsdp":
        dp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))["dp"]
    elif mode == "tp":
        tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"]
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, loss_parallel=True)
    if dp_mesh is not None:
        apply_fully_shard(model, {"mesh": dp_mesh})
        per_rank = tokens.shape[1] // dp_mesh.size()
        start = dp_mesh.get_local_rank() * per_rank
        tokens = tokens[:, start : start + per_rank]
    losses = _train(model, tokens, loss_parallel=tp_mesh is not None, dp_mesh=dp_mesh)

    ref_state = reference.state_dict()
    # Guard against a vacuous comparison: training must have moved every weight.
    moved = min((ref_state[n] - p).abs().max().item() for n, p in initial.items())
    weight_diff = {
        name: (cast(DTensor, param).full_tensor() - ref_state[name]).abs().max().item()
        for name, param in model.named_parameters()
    }
    placements = {n: str(cast(DTensor, p).placements) for n, p in model.named_parameters()}
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "weight_diff": weight_diff,
        "moved": moved,
        "placements": placements,
    }


def composed_prepare_module_on_ranks() -> list[float]:
    """prepare_module gives the same outputs through PrepareModuleInputOutput and the fallback."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    head = Head()
    x = torch.randn(2, SEQ, DIM)
    expected = head(x)
    local_x = x.chunk(2, dim=1)[dist.get_rank()]
    diffs = []
    original = styles_mod._PrepareModuleInputOutput
    for cls in (original, None):
        styles_mod._PrepareModuleInputOutput = cls
        try:
            model = apply_tensor_parallel(copy.deepcopy(head), mesh, loss_parallel=False)
        finally:
            styles_mod._PrepareModuleInputOutput = original
        out = model(local_x)
        assert type(out) is torch.Tensor
        diffs.append((out - expected).abs().max().item())
    return diffs


# --------------------------------------------------------------------------- tests


@pytest.mark.multirank
@pytest.mark.parametrize(("tp", "meta_and_compiled"), [(2, False), (4, False), (2, True)])
def test_plan_gives_expected_placements(tp: int, meta_and_compiled: bool) -> None:
    results = run_on_ranks(tp_layout_on_ranks, tp, meta_and_compiled)
    expected = expected_tp_layout(tp)
    for layout in results:
        assert set(layout) == set(expected)
        for name, (placements, shape) in expected.items():
            assert layout[name] == (placements, shape), name


@pytest.mark.multirank
def test_real_fully_shard_through_protocol() -> None:
    full_shapes = {n: p.shape for n, p in TinyTransformer().named_parameters()}
    for layout in run_on_ranks(fsdp_layout_on_ranks, 2):
        assert set(layout) == set(full_shapes)
        for name, (placements, shape) in layout.items():
            full = full_shapes[name]
            assert placements == (Shard(0),), name
            assert shape == (full[0] // 2, *full[1:]), name


@pytest.mark.multirank
@pytest.mark.parametrize(("mode", "world"), [("fsdp", 2), ("tp", 2), ("fsdp_tp", 4)])
def test_numeric_parity_with_single_process(mode: str, world: int) -> None:
    for result in run_on_ranks(parity_on_ranks, world, mode):
        torch.testing.assert_close(result["losses"], result["ref_losses"], rtol=1e-5, atol=0)
        assert max(result["weight_diff"].values()) < 1e-5, result["weight_diff"]
        assert result["moved"] > 1e-4
    if mode == "fsdp_tp":
        assert (
            result["placements"]["layers.0.attention.wo.weight"] == "(Shard(dim=0), Shard(dim=1))"
        )


@pytest.mark.multirank
def test_prepare_module_fallback_composes_input_and_output() -> None:
    for diffs in run_on_ranks(composed_prepare_module_on_ranks, 2):
        assert max(diffs) < 1e-6


# --------------------------------------------------------- single-process tests


class Recorder(nn.Module):
    def __init__(self, name: str, calls: list[tuple[str, dict[str, Any]]], *children: nn.Module):
        super().__init__()
        self.name, self.calls = name, calls
        self.kids = nn.ModuleList(children)

    def fully_shard(self, config: dict[str, Any]) -> None:
        self.calls.append((self.name, config))


def test_apply_fully_shard_is_post_order_and_copies_config() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    tree = Recorder("root", calls, Recorder("a", calls, Recorder("a1", calls)), nn.Linear(2, 2))
    tree.kids.append(Recorder("b", calls))
    config = {"mesh": "dp-mesh", "reshard_after_forward": True}
    assert isinstance(tree, FullyShard) and not isinstance(tree.kids[1], FullyShard)
    assert apply_fully_shard(tree, config) is tree
    assert [name for name, _ in calls] == ["a1", "a", "b", "root"]
    assert all(c == config and c is not config for _, c in calls)

    calls.clear()
    # Under PP the calls get the config unchanged (an explicit reshard_after_forward in a
    # call must not collide); the FSDP modules are switched to False afterwards.
    apply_fully_shard(tree, config, pp_enabled=True)
    assert all(c == config for _, c in calls)
    assert config == {"mesh": "dp-mesh", "reshard_after_forward": True}


def test_apply_fully_shard_looks_through_compiled_modules() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    inner = Recorder("root", calls, Recorder("child", calls))
    inner.kids[0] = cast(nn.Module, torch.compile(inner.kids[0]))  # a child compiled in place
    compiled = cast(nn.Module, torch.compile(inner))  # constructed only: CPU compile is slow
    assert apply_fully_shard(compiled, {}) is compiled
    assert [name for name, _ in calls] == ["child", "root"]


class PlanOwner(nn.Module):
    def __init__(self, plan: Any) -> None:
        super().__init__()
        self.plan = plan
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def parallelize_plan(self, loss_parallel: bool) -> Any:
        return self.plan


FAKE_MESH: Any = types.SimpleNamespace(ndim=1, mesh_dim_names=("tp",))  # enough to fail early


def test_unknown_plan_key_names_module_key_and_children() -> None:
    owner = PlanOwner({"proj": colwise_parallel(), "attention.wq": colwise_parallel()})
    assert isinstance(owner, ParallelPlan)
    with pytest.raises(PlanKeyError) as err:
        # Keys are resolved before anything is applied, so the fake mesh is never used.
        apply_tensor_parallel(nn.Sequential(owner), FAKE_MESH)
    assert str(err.value).startswith(
        "PlanOwner.parallelize_plan() has the key 'attention.wq', but no submodule of the "
        "module itself matches 'attention' (available children: ['proj'])."
    )
    owner.plan = {
        "proj.bias": parameter_parallel([Shard(0)]),
        "scales": parameter_parallel([Shard(0)]),
    }
    with pytest.raises(PlanKeyError, match=r"bare parameters: \['scale'\]"):
        apply_tensor_parallel(owner, FAKE_MESH)


def test_plan_that_is_not_a_dict_is_rejected() -> None:
    owner = PlanOwner([("proj", colwise_parallel())])
    with pytest.raises(
        TypeError, match=r"PlanOwner.parallelize_plan\(loss_parallel=False\) returned a list"
    ):
        apply_tensor_parallel(owner, FAKE_MESH)


def test_styles_build_torch_styles_and_reject_wrong_targets() -> None:
    linear = nn.Linear(4, 4)
    assert type(colwise_parallel()(linear)).__name__ == "ColwiseParallel"
    style = rowwise_parallel(output_layouts=Shard(1))(linear)
    assert isinstance(style, RowwiseParallel) and style.output_layouts == (Shard(1),)
    pmi = prepare_module_input(input_layouts=Shard(1), desired_input_layouts=Replicate())
    assert isinstance(pmi(linear), PrepareModuleInput)
    assert parameter_parallel(Shard(0)).placements == (Shard(0),)
    with pytest.raises(TypeError, match="use parameter_parallel"):
        colwise_parallel()(nn.Parameter(torch.ones(2)))
    with pytest.raises(TypeError, match=r"targets bare nn\.Parameter"):
        parameter_parallel([Shard(0)])(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prepare_module_input"):
        prepare_module(input_layouts=Shard(1), desired_input_layouts=Replicate())


def _fake_float8_linear() -> nn.Module:
    cls = type("Float8Linear", (nn.Linear,), {"__module__": "torchao.float8.float8_linear"})
    return cls(4, 4)


def test_float8_linear_selects_torchao_styles(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("torchao.float8.float8_tensor_parallel")
    for name in ("Float8ColwiseParallel", "Float8RowwiseParallel", "PrepareFloat8ModuleInput"):
        setattr(
            fake, name, type(name, (), {"__init__": lambda self, **kw: setattr(self, "kw", kw)})
        )
    monkeypatch.setitem(sys.modules, "torchao.float8.float8_tensor_parallel", fake)
    fp8 = _fake_float8_linear()
    parent = nn.Sequential(fp8)
    style: Any = colwise_parallel(use_local_output=False)(fp8)
    assert type(style) is fake.Float8ColwiseParallel and style.kw["use_local_output"] is False
    assert type(rowwise_parallel()(fp8)) is fake.Float8RowwiseParallel
    assert (
        type(prepare_module_input(input_layouts=Shard(1))(parent)) is fake.PrepareFloat8ModuleInput
    )
    composed: Any = prepare_module(output_layouts=Shard(1), desired_output_layouts=Shard(1))(parent)
    assert type(composed.styles[0]) is fake.PrepareFloat8ModuleInput
    assert type(colwise_parallel()(nn.Linear(4, 4))).__name__ == "ColwiseParallel"


def test_float8_without_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8.float8_tensor_parallel", None)
    with pytest.raises(ImportError, match=r"dream-trainer\[fp8\]"):
        colwise_parallel()(_fake_float8_linear())


def test_import_does_not_import_torchao() -> None:
    code = "import sys, dream_trainer.parallel; print(sorted(m for m in sys.modules if 'torchao' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
