"""Parity: every data/tensor-parallel layout trains exactly like one process.

Same model, data and seed; 8 optimizer steps in fp32 with gradient accumulation 2 and clipping.
Per-step losses (as the trainer logs them: reduced over data-parallel ranks) must match one
process within 1e-5 relative. Final full weights: with AdamW within 1e-4 absolute (Adam divides
by sqrt(v), which magnifies float reassociation from different reduction orders), with SGD
within 1e-6.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters, TrainingParameters
from tests.multirank import run_on_ranks
from tests.parity_model import ParityConfig, ParityTrainer

STEPS = 8
LOSS_RTOL = 1e-5
WEIGHT_ATOL = {"adamw": 1e-4, "sgd": 1e-6}


class RecordingTrainer(ParityTrainer):
    """Keeps every training-loss value the trainer logs."""

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.logged_losses.append(metrics["train/loss"])


def full_weights(trainer: ParityTrainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in trainer.model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = value.detach().cpu().clone()
    return out


def parity_config(
    device_parameters: DeviceParameters, optimizer: str, clip: float = 1.0, **overrides: Any
) -> ParityConfig:
    return ParityConfig(
        seed=7,
        optimizer=optimizer,
        lr=1e-3 if optimizer == "adamw" else 0.5,
        device_parameters=device_parameters,
        training_parameters=TrainingParameters(
            n_epochs=1, max_steps=STEPS, gradient_accumulation_steps=2, gradient_clip_val=clip
        ),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        **overrides,
    )


def train(
    device_parameters: DeviceParameters,
    optimizer: str = "adamw",
    trainer_class: type[RecordingTrainer] = RecordingTrainer,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on this rank; return the logged losses and the full final weights."""
    trainer = trainer_class(parity_config(device_parameters, optimizer, **overrides))
    trainer.logged_losses = []
    trainer.fit()
    return {
        "losses": trainer.logged_losses,
        "weights": full_weights(trainer),
        "steps": trainer.global_step,
    }


@functools.cache
def reference(optimizer: str, **overrides: Any) -> dict[str, Any]:
    (result,) = run_on_ranks(train, 1, DeviceParameters.SINGLE_DEVICE(), optimizer, **overrides)
    assert result["steps"] == STEPS and len(result["losses"]) == STEPS
    return result


def assert_matches_reference(
    results: list[dict[str, Any]], optimizer: str, pipelined: bool = False, **overrides: Any
) -> None:
    """Losses and final weights equal one process's; a pipeline rank holds only its stages'
    weights, so then every weight must be on some rank and match wherever it is."""
    ref = reference(optimizer, **overrides)
    seen: set[str] = set()
    for rank, result in enumerate(results):
        assert result["steps"] == STEPS
        torch.testing.assert_close(
            torch.tensor(result["losses"]),
            torch.tensor(ref["losses"]),
            rtol=LOSS_RTOL,
            atol=0,
            msg=lambda m, r=rank: f"rank {r} losses differ from one process: {m}",
        )
        if pipelined:
            assert result["weights"].keys() <= ref["weights"].keys()
        else:
            assert result["weights"].keys() == ref["weights"].keys()
        seen |= result["weights"].keys()
        for name, value in result["weights"].items():
            torch.testing.assert_close(
                value,
                ref["weights"][name],
                rtol=0,
                atol=WEIGHT_ATOL[optimizer],
                msg=lambda m, r=rank, n=name: f"rank {r} weight {n}: {m}",
            )
    assert seen == ref["weights"].keys(), sorted(ref["weights"].keys() - seen)


LAYOUTS = {
    "ddp2": (2, DeviceParameters.DDP(), {}),
    "ddp4": (4, DeviceParameters.DDP(), {}),
    "fsdp2": (2, DeviceParameters.FSDP(), {}),
    "fsdp4": (4, DeviceParameters.FSDP(), {}),
    "hsdp2x2": (4, DeviceParameters.HSDP(dp_shard=2), {}),
    "tp2": (2, DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2), {}),
    "tp2_sp_lossparallel": (
        2,
        DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2, loss_parallel=True),
        {"sequence_parallel": True},
    ),
    "fsdp2_tp2": (
        4,
        DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2),
        {"sequence_parallel": True},
    ),
    "ddp2_tp2": (4, DeviceParameters.DDP(tensor_parallel=2), {}),
    "fsdp2_activation_checkpointing": (2, DeviceParameters.FSDP(checkpoint_activations=True), {}),
    "fsdp2_selective_activation_checkpointing": (
        2,
        DeviceParameters.FSDP(
            checkpoint_activations=True, activation_checkpoint_config={"mode": "selective"}
        ),
        {},
    ),
    "ddp2_cpu_offload": (2, DeviceParameters.DDP(cpu_offload=True), {}),
    "fsdp2_cpu_offload": (2, DeviceParameters.FSDP(cpu_offload=True), {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process_with_adamw(layout):
    world_size, params, overrides = LAYOUTS[layout]
    results = run_on_ranks(train, world_size, params, "adamw", timeout=300, **overrides)
    assert_matches_reference(results, "adamw")


@pytest.mark.parametrize("layout", ["ddp2", "fsdp2", "fsdp2_tp2"])
def test_layout_matches_one_process_with_sgd_tightly(layout):
    world_size, params, overrides = LAYOUTS[layout]
    results = run_on_ranks(train, world_size, params, "sgd", timeout=300, **overrides)
    assert_matches_reference(results, "sgd")


class NoSyncTrainer(RecordingTrainer):
    """A broken layout: gradients are never averaged across data-parallel ranks."""

    def backward(self, loss: torch.Tensor, num_tokens: Any = None) -> None:
        self.model.set_requires_gradient_sync(False)
        (loss / self.config.training_parameters.gradient_accumulation_steps).backward()


def test_a_layout_that_skips_gradient_sync_fails_the_parity_check():
    results = run_on_ranks(
        train, 2, DeviceParameters.DDP(), "sgd", trainer_class=NoSyncTrainer, timeout=300
    )
    with pytest.raises(AssertionError):
        assert_matches_reference(results, "sgd")


def compiled(params: DeviceParameters, backend: str) -> DeviceParameters:
    return params.model_copy(update={"compile_model": True, "compile_backend": backend})


# aot_eager runs the same dynamo + AOTAutograd path as inductor (where compile under TP lost
# the embedding's gradients) without generating code, so the whole matrix stays quick.
COMPILED_LAYOUTS = ["ddp2", "fsdp2", "tp2", "tp2_sp_lossparallel", "fsdp2_tp2", "hsdp2x2"]


@pytest.mark.parametrize("layout", COMPILED_LAYOUTS)
def test_compiled_layout_matches_one_process(layout, request):
    world_size, params, overrides = LAYOUTS[layout]
    if layout == "fsdp2_tp2":  # the first fit of the two-fit run the tests below share
        results = [first for first, _ in request.getfixturevalue("fsdp2_tp2_compiled_twice")]
    else:
        results = run_on_ranks(
            train, world_size, compiled(params, "aot_eager"), "adamw", timeout=600, **overrides
        )
    assert_matches_reference(results, "adamw")


@pytest.mark.parametrize("layout", ["tp2_sp_lossparallel", "fsdp2_tp2"])
def test_layout_compiled_with_inductor_matches_one_process(layout, request):
    world_size, params, overrides = LAYOUTS[layout]
    if layout == "tp2_sp_lossparallel":  # the first fit of the run the cache test shares
        runs = request.getfixturevalue("tp2_sp_inductor_twice_sharing_a_compile_cache")
        results = [first for first, _ in runs]
    else:
        results = run_on_ranks(
            train, world_size, compiled(params, "inductor"), "adamw", timeout=900, **overrides
        )
    assert_matches_reference(results, "adamw")


class TorchCompiledTrainer(RecordingTrainer):
    """Compiles its blocks with torch directly, bypassing dream_trainer's compile_module."""

    def apply_compile(self) -> None:
        for block in self.model.layers:
            block.compile(backend="aot_eager")


def train_twice(params: DeviceParameters, **overrides: Any) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from tests.multirank import _extra_groups

    first = train(params, "adamw", **overrides)
    dist.barrier()
    for group in _extra_groups(dist):  # as an application that tears its meshes down does
        dist.destroy_process_group(group)
    return [first, train(params, "adamw", trainer_class=TorchCompiledTrainer, **overrides)]


@pytest.fixture(scope="module")
def fsdp2_tp2_compiled_twice() -> list[list[dict[str, Any]]]:
    """Per rank: a fit of fsdp2_tp2 compiled (aot_eager) by dream_trainer, then in the same
    process a second fit whose blocks the user compiles with torch (``TorchCompiledTrainer``).
    Three tests check this one run: the first fit, the second fit, and the two together."""
    world_size, params, overrides = LAYOUTS["fsdp2_tp2"]
    return run_on_ranks(
        train_twice, world_size, compiled(params, "aot_eager"), timeout=600, **overrides
    )


def test_blocks_a_user_compiles_with_torch_keep_their_gradients_under_tensor_parallel(
    fsdp2_tp2_compiled_twice,
):
    assert_matches_reference([second for _, second in fsdp2_tp2_compiled_twice], "adamw")


def test_a_second_compiled_fit_in_one_process_trains_like_the_first(fsdp2_tp2_compiled_twice):
    # Compiled graphs name the process groups of their collectives; a second fit builds new
    # groups, so the first fit's graphs must not be reused ("Could not resolve the process
    # group registered under the name ...").
    runs = fsdp2_tp2_compiled_twice
    for first, second in runs:
        assert first["losses"] == pytest.approx(second["losses"], rel=1e-6)
    assert_matches_reference([run[1] for run in runs], "adamw")


def train_twice_sharing_a_compile_cache(
    params: DeviceParameters, cache_dir: str, **overrides: Any
) -> list[dict[str, Any]]:
    import os

    import torch.distributed as dist

    from tests.multirank import _extra_groups

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # fresh, shared by both fits
    try:
        first = train(params, "adamw", **overrides)
        dist.barrier()
        for group in _extra_groups(dist):
            dist.destroy_process_group(group)
        # The second fit's groups get new names: Inductor's cache must not hand it the code
        # compiled for the first fit's groups.
        return [first, train(params, "adamw", **overrides)]
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")


@pytest.fixture(scope="module")
def tp2_sp_inductor_twice_sharing_a_compile_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[list[dict[str, Any]]]:
    """Per rank: two inductor fits of tp2_sp_lossparallel sharing a fresh Inductor cache."""
    world_size, params, overrides = LAYOUTS["tp2_sp_lossparallel"]
    return run_on_ranks(
        train_twice_sharing_a_compile_cache, world_size, compiled(params, "inductor"),
        str(tmp_path_factory.mktemp("inductor")), timeout=900, **overrides,
    )  # fmt: skip


def test_a_second_inductor_fit_never_loads_code_compiled_for_other_process_groups(
    tp2_sp_inductor_twice_sharing_a_compile_cache,
):
    # Without tag_compile_caches_with_groups (called by fit) the second fit loaded the first
    # fit's cached code and trained to other losses (step 2: 4.28460 instead of 4.28541),
    # silently; in a longer-lived process it failed with "Could not resolve the process group
    # registered under the name ...".
    runs = tp2_sp_inductor_twice_sharing_a_compile_cache
    for first, second in runs:
        assert first["losses"] == pytest.approx(second["losses"], rel=1e-6)
    assert_matches_reference([run[1] for run in runs], "adamw")
