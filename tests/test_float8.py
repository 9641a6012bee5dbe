"""float8 training through torchao: conversion, config errors, and layouts against one process.

float8 rounds each matmul input with a scale taken from its absolute maximum, so a layout can
only match a one-process float8 run that sees the same tensors: the reference is fed each
data-parallel rank's micro-batches one after the other (accumulating their gradients), rather
than one large batch whose maximum would set a different scale. Under FSDP the weight scales are
the whole weight's (FSDP gathers it, or all-reduces its maximum with the float8 all-gather), and
under tensor parallelism the activation and gradient scales are reduced over the TP group, so
the float8 values are the same as in one process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dream_trainer.configs import DeviceParameters, Float8Config
from dream_trainer.parallel.float8 import (
    check_float8_layout,
    convert_to_float8,
    is_float8_linear,
    uses_float8_tensor_parallel,
)
from examples.llama3.configs import LlamaArgs
from examples.llama3.data import build_dataloader, build_dataset
from examples.llama3.model import Transformer
from tests.multirank import run_on_ranks
from tests.test_llama3_train import RecordingLlama3Trainer, tiny_config

pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is not installed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The JSONL corpus of tests/test_llama3_train.py, and a tokenizer cache for this module."""
    root = tmp_path_factory.mktemp("float8")
    docs = [
        f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" * (1 + i % 3)
        for i in range(400)
    ]
    path = root / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return {"data": str(path), "cache": str(root / "cache")}


# torch's CPU float8 matmul is a slow reference kernel (80 s instead of 0.7 s for one run of
# this module's model); emulation rounds the inputs to float8 the same way, in fp32 matmuls.
EMULATED = {"float8": True, "float8_config": {"emulate": True}}
FLOAT8 = {"float8": True, "float8_config": {"emulate": True, "float8_tensor_parallel": False}}

# The first step (before any update: the same weights, data and scales) matches one process to
# 1e-5. After it, a layout sums in another order (FSDP's reduce-scatter of gradients, TP's
# partial products: ~1e-7 relative in fp32), and AdamW turns a tiny gradient difference into up
# to +-lr (1e-3) on a weight whose gradient is near zero; the next float8 cast then rounds the
# odd value on a rounding boundary the other way, and e4m3 keeps 3 mantissa bits, so that value
# moves by 1/8. A float8 run therefore drifts from one process far faster than fp32 runs (1e-7
# in loss). Measured after 6 steps, FSDP 2 and FSDP 2 x TP 2 alike: losses 1.1e-4 and 1.4e-4
# relative, weights 7.8e-4 (3.5e-4 and 1.9e-3 under TP with torch's CPU float8 kernel instead
# of emulation), while float8 itself moves the one-process run from fp32 by 2.6e-3 (losses) and
# 5.3e-3 (weights). The bounds sit between the two.
FLOAT8_LOSS_RTOL = 1e-3
FLOAT8_WEIGHT_ATOL = 3e-3


# ------------------------------------------------------------------------- conversion


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(32, 64, bias=False)
        self.head = nn.Linear(64, 16)
        self.odd = nn.Linear(16, 10)


def test_conversion_swaps_linears_in_place_and_keeps_names() -> None:
    with torch.device("meta"):
        net = Net()
    names = [n for n, _ in net.named_parameters()]
    converted = convert_to_float8(net, Float8Config(exclude_modules=["od?"]))
    assert converted == ["inner", "head"]
    assert is_float8_linear(net.inner) and is_float8_linear(net.head)
    assert type(net.odd) is nn.Linear
    assert [n for n, _ in net.named_parameters()] == names
    # tensorwise casts before the TP all-gathers unless turned off; rowwise never does.
    assert uses_float8_tensor_parallel(net.inner)
    for config in (Float8Config(float8_tensor_parallel=False), Float8Config(recipe="rowwise")):
        with torch.device("meta"):
            other = nn.Sequential(nn.Linear(16, 16))
        convert_to_float8(other, config)
        assert is_float8_linear(other[0]) and not uses_float8_tensor_parallel(other[0])


def test_conversion_refuses_what_float8_cannot_run() -> None:
    with pytest.raises(ValueError, match=r"'odd'.* 10 x 16.*multiples of 16.*exclude_modules"):
        convert_to_float8(Net(), Float8Config())
    with pytest.raises(ValueError, match=r"no nn.Linear to convert in Net \(3 Linear layers"):
        convert_to_float8(Net(), Float8Config(exclude_modules=["*"]))
    tied = nn.ModuleDict({"embed": nn.Embedding(32, 16), "out": nn.Linear(16, 32, bias=False)})
    tied["out"].weight = tied["embed"].weight
    with pytest.raises(ValueError, match=r"untie it from embed.weight; add 'out' to"):
        convert_to_float8(tied, Float8Config(enable_fsdp_float8_all_gather=True))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"float8_config is set .* but float8=False"):
        DeviceParameters(float8_config={"emulate": True})
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather=True needs recipe='tensor"):
        Float8Config(recipe="rowwise", enable_fsdp_float8_all_gather=True)
    with pytest.raises(ValueError, match="float8_tensor_parallel=True needs recipe='tensorwise'"):
        Float8Config(recipe="rowwise_with_gw_hp", float8_tensor_parallel=True)
    with pytest.raises(ValueError, match=r"runs no FSDP .* there is no weight all-gather"):
        check_float8_layout(Float8Config(enable_fsdp_float8_all_gather=True), False, None)
    with pytest.raises(
        ValueError, match=r"gloo cannot .* float8_config.float8_tensor_parallel=Fal"
    ):
        check_float8_layout(Float8Config(), True, "gloo")
    check_float8_layout(Float8Config(), True, "nccl")
    check_float8_layout(Float8Config(float8_tensor_parallel=False), True, "gloo")


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match=r"pip install 'dream-trainer\[fp8\]'"):
        convert_to_float8(nn.Sequential(nn.Linear(16, 16)), Float8Config())


# ------------------------------------------------------------------------ training runs


class _Interleaved:
    """Each data-parallel rank's micro-batches in turn: what ``data_ranks`` ranks would read."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders) * len(self.loaders)

    def __iter__(self) -> Any:
        for batches in zip(*self.loaders):
            yield from batches


class PerRankDataTrainer(RecordingLlama3Trainer):
    data_ranks = 1

    def configure_dataloaders(self) -> tuple[Any, Any]:
        if self.data_ranks == 1:
            return super().configure_dataloaders()
        cfg = self.config
        train = build_dataset(cfg.data, self.tokenizer, cfg.seq_len, "train")
        loaders = [
            build_dataloader(
                train, cfg.batch_size, dp_rank=r, dp_size=self.data_ranks, seed=cfg.seed
            )
            for r in range(self.data_ranks)
        ]
        return _Interleaved(loaders), None


def train_float8(
    corpus: dict[str, str], dp_size: int, data_ranks: int = 1, **device: Any
) -> dict[str, Any]:
    """Train the tiny Llama; ``data_ranks`` > 1 (one process) reads as that many DP ranks."""
    os.environ["DREAM_TRAINER_CACHE"] = corpus["cache"]
    per_rank = 2  # sequences per micro-batch on each data-parallel rank
    params = DeviceParameters(**{"dp_shard": dp_size, **device})
    config = tiny_config(params, 1, corpus["data"])
    config.batch_size = per_rank
    accumulation = config.training_parameters.gradient_accumulation_steps * data_ranks
    config.training_parameters = config.training_parameters.model_copy(
        update={"gradient_accumulation_steps": accumulation}
    )
    trainer = PerRankDataTrainer(config)
    trainer.data_ranks, trainer.losses = data_ranks, []
    trainer.fit()
    converted = sum(is_float8_linear(m) for m in trainer.model.modules())
    # With the float8 all-gather, torchao wraps each converted weight (FSDP's local shard).
    cast = sum(
        type(getattr(p, "_local_tensor", p)).__name__ == "WeightWithDynamicFloat8CastTensor"
        for p in trainer.model.parameters()
    )
    # Scales computed after the last optimizer step by precompute_fsdp_scales.
    precomputed = sum(
        getattr(getattr(p, "_local_tensor", p), "_precomputed_scale", None) is not None
        for p in trainer.model.parameters()
    )
    weights = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in trainer.model.named_parameters()
    }
    return {
        "losses": trainer.losses,
        "weights": weights,
        "converted": converted,
        "cast": cast,
        "precomputed": precomputed,
    }


@pytest.fixture(scope="module")
def reference(corpus: dict[str, str]) -> dict[str, Any]:
    """One process training in float8, reading as two data-parallel ranks would."""
    (result,) = run_on_ranks(train_float8, 1, corpus, 1, 2, timeout=300, **EMULATED)
    return result


def _assert_close_to(results: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    """The first step's loss within fp32's 1e-5, later losses and the weights within float8's
    bounds (see FLOAT8_LOSS_RTOL)."""
    for rank, result in enumerate(results):
        assert result["converted"] == expected["converted"] == 15  # 7 per block + the output
        losses, reference = torch.tensor(result["losses"]), torch.tensor(expected["losses"])
        torch.testing.assert_close(losses[0], reference[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(
            losses,
            reference,
            rtol=FLOAT8_LOSS_RTOL,
            atol=0,
            msg=lambda m, r=rank: f"rank {r}: {m}",
        )
        for name, value in result["weights"].items():
            torch.testing.assert_close(
                value, expected["weights"][name], rtol=0, atol=FLOAT8_WEIGHT_ATOL
            )


def test_float8_changes_the_numbers() -> None:
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for float8 in (False, True):
        with torch.device("meta"):
            model = Transformer(args)
        if float8:
            convert_to_float8(model, Float8Config())
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        logits = model(tokens[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item())
    gap = abs(losses[1] - losses[0]) / losses[0]
    assert 1e-5 < gap < 1e-2, losses  # float8 rounding shows, yet the model computes alike


ALL_GATHER = {"emulate": True, "enable_fsdp_float8_all_gather": True}


@pytest.fixture(scope="module")
def all_gather_run(corpus: dict[str, str]) -> list[dict[str, Any]]:
    device = {"float8": True, "float8_config": ALL_GATHER}
    return run_on_ranks(train_float8, 2, corpus, 2, timeout=300, **device)


@pytest.mark.multirank
def test_fsdp2_with_float8_all_gather_matches_one_process(all_gather_run, reference) -> None:
    assert [r["cast"] for r in all_gather_run] == [15, 15]
    assert [r["precomputed"] for r in all_gather_run] == [0, 0]
    _assert_close_to(all_gather_run, reference)


@pytest.mark.multirank
def test_precomputed_fsdp_scales_train_exactly_like_per_weight_scales(
    corpus, all_gather_run
) -> None:
    device = {"float8": True, "float8_config": {**ALL_GATHER, "precompute_fsdp_scales": True}}
    results = run_on_ranks(train_float8, 2, corpus, 2, timeout=300, **device)
    assert [r["precomputed"] for r in results] == [15, 15]  # every float8 weight, every rank
    for result, per_weight in zip(results, all_gather_run):
        assert result["losses"] == per_weight["losses"]  # one all-reduce, the same scales
        for name, value in result["weights"].items():
            torch.testing.assert_close(value, per_weight["weights"][name], rtol=0, atol=0)


def test_precomputed_scales_need_the_float8_all_gather() -> None:
    with pytest.raises(ValueError, match="precompute_fsdp_scales=True precomputes the scales"):
        Float8Config(precompute_fsdp_scales=True)


@pytest.mark.multirank
def test_float8_compile_and_selective_checkpointing_under_fsdp2_x_tp2(corpus, reference):
    device = {
        **FLOAT8,
        "tensor_parallel": 2,
        "compile_model": True,
        "compile_backend": "aot_eager",
        "checkpoint_activations": True,
        "activation_checkpoint_config": {"mode": "selective"},
    }
    results = run_on_ranks(train_float8, 4, corpus, 2, timeout=600, **device)
    _assert_close_to(results, reference)
