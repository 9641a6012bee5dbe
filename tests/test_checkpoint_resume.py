"""Exact resume: a run stopped and resumed from its checkpoint trains bit for bit like one that
never stopped (CPU fp32), under one process, FSDP 2 and FSDP 2 x TP 2; and under another layout
the weights, optimizer state and the global data order carry over."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters, TrainingParameters
from tests.multirank import run_on_ranks
from tests.parity_model import ParityConfig
from tests.test_trainer_parity import RecordingTrainer, full_weights

# 48 samples, 16 per step: 3 steps per epoch. The stop is in the middle of the second epoch (the
# resumed run then crosses two epoch boundaries), and so is every segment's end in the layout
# chain below (steps 2, 5, 7).
TOTAL, STOP, SAMPLES = 10, 4, 48


def resume_config(
    params: DeviceParameters,
    max_steps: int,
    run_dir: str,
    checkpoints: bool,
    resume: str,
    **fields: Any,
) -> ParityConfig:
    """The parity model with accumulation 2 and clipping, checkpointing (or not) into run_dir."""
    return ParityConfig(
        seed=7,
        lr=1e-3,
        shuffle=True,
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(
            n_epochs=4, max_steps=max_steps, gradient_accumulation_steps=2, gradient_clip_val=1.0
        ),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        checkpoint_parameters={"enable": checkpoints, "resume": resume},
        **{"dataset_size": SAMPLES, **fields},
    )


def run(
    params: DeviceParameters,
    max_steps: int,
    run_dir: str,
    checkpoints: bool,
    resume: str = "auto",
    **fields: Any,
) -> dict[str, Any]:
    config = resume_config(params, max_steps, run_dir, checkpoints, resume, **fields)
    trainer = RecordingTrainer(config)
    trainer.logged_losses = []
    trainer.fit()
    return {
        "losses": trainer.logged_losses,
        "weights": full_weights(trainer),
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "optimizer": {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for k, v in _flat_optimizer_state(trainer).items()
        },
    }


def _flat_optimizer_state(trainer: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"]
    return {f"{p}.{k}": v for p, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


LAYOUTS = {
    "single": (1, DeviceParameters.SINGLE_DEVICE(), {}),
    "fsdp2": (2, DeviceParameters.FSDP(), {}),
    "fsdp2_tp2": (
        4,
        DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2),
        {"sequence_parallel": True},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_resumed_run_trains_bit_for_bit_like_one_that_never_stopped(layout, tmp_path):
    ranks, params, fields = LAYOUTS[layout]
    straight = run_on_ranks(run, ranks, params, TOTAL, str(tmp_path / "a"), False, **fields)
    first = run_on_ranks(run, ranks, params, STOP, str(tmp_path / "b"), True, **fields)
    resumed = run_on_ranks(run, ranks, params, TOTAL, str(tmp_path / "b"), True, **fields)
    for rank in range(ranks):
        whole, head, tail = straight[rank], first[rank], resumed[rank]
        assert head["step"] == STOP and head["epoch"] == 1  # stopped inside epoch 1
        assert head["losses"] + tail["losses"] == whole["losses"]  # bitwise
        assert tail["step"] == TOTAL
        for name, value in whole["weights"].items():
            assert torch.equal(tail["weights"][name], value), name
        for name, value in whole["optimizer"].items():
            assert torch.equal(tail["optimizer"][name], value), name


class CaptureAfterLoad(RecordingTrainer):
    """Records the full weights and optimizer state right after setup (after the resume)."""

    def setup(self) -> None:
        super().setup()
        self.loaded: dict[str, Any] = {}
        if self.global_step:  # resumed (reading a fresh optimizer's state would initialize it)
            self.loaded = {
                "weights": full_weights(self),
                "optimizer": _full(_flat_optimizer_state(self)),
            }


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in state.items()
    }


def segment(
    params: DeviceParameters, max_steps: int, run_dir: str, **fields: Any
) -> dict[str, Any]:
    config = resume_config(params, max_steps, run_dir, True, "auto", **fields)
    trainer = CaptureAfterLoad(config)
    trainer.logged_losses = []
    trainer.fit()
    return {
        "losses": trainer.logged_losses,
        "loaded": trainer.loaded,
        "weights": full_weights(trainer),
        "optimizer": _full(_flat_optimizer_state(trainer)),
    }


def test_resuming_under_other_layouts_keeps_weights_optimizer_and_data_order(tmp_path):
    fsdp4 = DeviceParameters.FSDP()
    (straight, *_) = run_on_ranks(run, 4, fsdp4, TOTAL, str(tmp_path / "a"), False)
    chain = [
        (4, fsdp4, {}),
        (4, DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2), {"sequence_parallel": True}),
        (2, DeviceParameters.FSDP(), {}),
        (1, DeviceParameters.SINGLE_DEVICE(), {}),
    ]
    losses: list[float] = []
    previous: dict[str, Any] | None = None
    for index, (ranks, params, fields) in enumerate(chain):
        steps = (index + 1) * TOTAL // len(chain)
        (result, *_) = run_on_ranks(segment, ranks, params, steps, str(tmp_path / "b"), **fields)
        if previous is not None:  # what was loaded is exactly what the last layout saved
            for kind in ("weights", "optimizer"):
                for name, value in previous[kind].items():
                    assert torch.equal(result["loaded"][kind][name], value), (index, kind, name)
        losses += result["losses"]
        previous = result
    assert previous is not None
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(straight["losses"]), rtol=1e-5, atol=0
    )
    for name, value in straight["weights"].items():
        torch.testing.assert_close(previous["weights"][name], value, rtol=0, atol=1e-4)


def test_a_pipeline_checkpoint_resumes_without_pipeline_parallelism(tmp_path):
    pp = DeviceParameters(
        pipeline_parallel=2, dp_shard=1, pipeline_parallel_config={"num_microbatches": 2}
    )
    straight = run_on_ranks(
        run, 1, DeviceParameters.SINGLE_DEVICE(), TOTAL, str(tmp_path / "a"), False, n_layers=4
    )[0]
    run_on_ranks(segment, 2, pp, STOP, str(tmp_path / "b"), n_layers=4)
    (resumed,) = run_on_ranks(
        segment, 1, DeviceParameters.SINGLE_DEVICE(), TOTAL, str(tmp_path / "b"), n_layers=4
    )
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][STOP:]), rtol=1e-5, atol=0
    )
    for name, value in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-4)
