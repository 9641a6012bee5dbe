"""The Llama 3 example's trainer: layout parity with one process, and the torchrun entry point."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dream_trainer.configs import DeviceParameters, TrainingParameters
from examples.llama3.train import Llama3Config, Llama3Trainer
from tests.multirank import run_on_ranks, run_torchrun

REPO = Path(__file__).resolve().parent.parent
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
GLOBAL_BATCH = 4
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A JSONL corpus of small Python-like documents, and a cache dir shared by the module."""
    root = tmp_path_factory.mktemp("llama3")
    docs = [
        {"text": f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" * (1 + i % 3)}
        for i in range(400)
    ]
    path = root / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    return {"data": str(path), "cache": str(root / "cache")}


def tiny_config(
    device_parameters: DeviceParameters, dp_size: int, data: str, **fields: Any
) -> Llama3Config:
    return Llama3Config(
        seed=3,
        model="debug",
        model_overrides=TINY,
        seq_len=32,
        batch_size=GLOBAL_BATCH // dp_size,
        lr=1e-3,
        warmup_steps=2,
        data=data,
        device_parameters=device_parameters,
        training_parameters=TrainingParameters(
            max_steps=STEPS, gradient_accumulation_steps=2, gradient_clip_val=1.0
        ),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        **fields,
    )


class RecordingLlama3Trainer(Llama3Trainer):
    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        return {}  # parity is about training; skip validation to keep the test short


def train_llama(
    params: DeviceParameters, dp_size: int, corpus: dict[str, str], **fields: Any
) -> dict[str, Any]:
    os.environ["DREAM_TRAINER_CACHE"] = corpus["cache"]
    trainer = RecordingLlama3Trainer(tiny_config(params, dp_size, corpus["data"], **fields))
    trainer.losses = []
    trainer.fit()
    weights = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for name, p in trainer.model.named_parameters()
    }
    return {"losses": trainer.losses, "weights": weights}


LAYOUTS = {
    "fsdp2": (2, DeviceParameters.FSDP(), 2),
    "tp2_sp_lossparallel": (
        2,
        DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2, loss_parallel=True),
        1,
    ),
    "fsdp2_tp2": (4, DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2, loss_parallel=True), 2),
    # torch.compile per block: under TP the first block's input used to lose its gradient (the
    # embedding trained with zero gradient under FSDP x TP). The edge was lost where dynamo takes
    # an async collective's output (dream_trainer/parallel/compile.py), before any backend, so TP
    # alone uses aot_eager (no code generation: quick); FSDP x TP keeps inductor.
    "tp2_compile_aot_eager": (
        2,
        DeviceParameters.FSDP(
            dp_shard=1, tensor_parallel=2, compile_model=True, compile_backend="aot_eager"
        ),
        1,
    ),
    "fsdp2_tp2_compile": (
        4,
        DeviceParameters.FSDP(
            dp_shard=2, tensor_parallel=2, loss_parallel=True, compile_model=True
        ),
        2,
    ),
    # Pipeline parallelism: the same training_step, run through the schedule.
    "pp2_1f1b": (
        2,
        DeviceParameters(
            pipeline_parallel=2,
            dp_shard=1,
            pipeline_parallel_config={"schedule": "1F1B", "num_microbatches": 2},
        ),
        1,
    ),
    "pp2_tp2_interleaved": (
        4,
        DeviceParameters(
            pipeline_parallel=2,
            dp_shard=1,
            tensor_parallel=2,
            loss_parallel=True,
            pipeline_parallel_config={
                "schedule": "Interleaved1F1B",
                "num_microbatches": 2,
                "stages_per_rank": 1,
            },
        ),
        1,
    ),
    # Context parallelism: batches cut along the sequence, rotary positions kept global.
    "cp2": (2, DeviceParameters(context_parallel=2, dp_shard=1), 1),
    "cp2_fsdp2": (4, DeviceParameters(context_parallel=2, dp_shard=2), 2),
    "cp2_tp2": (
        4,
        DeviceParameters(context_parallel=2, dp_shard=1, tensor_parallel=2, loss_parallel=True),
        1,
    ),
}


@pytest.fixture(scope="module")
def single_process(corpus: dict[str, str]) -> dict[str, Any]:
    (result,) = run_on_ranks(
        train_llama, 1, DeviceParameters.SINGLE_DEVICE(), 1, corpus, timeout=300
    )
    assert len(result["losses"]) == STEPS
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llama3_debug_run_matches_one_process(layout, corpus, single_process):
    world_size, params, dp_size = LAYOUTS[layout]
    results = run_on_ranks(train_llama, world_size, params, dp_size, corpus, timeout=900)
    for rank, result in enumerate(results):
        torch.testing.assert_close(
            torch.tensor(result["losses"]),
            torch.tensor(single_process["losses"]),
            rtol=1e-5,
            atol=0,
            msg=lambda m, r=rank: f"rank {r}: {m}",
        )
        for name, value in result["weights"].items():
            # AdamW after a few steps: float reassociation is magnified to ~1e-5..1e-4.
            torch.testing.assert_close(value, single_process["weights"][name], rtol=0, atol=1e-4)


def test_document_causal_attention_under_context_parallelism_matches_one_process(corpus):
    single = DeviceParameters.SINGLE_DEVICE()
    (plain,) = run_on_ranks(train_llama, 1, single, 1, corpus, timeout=300)
    (expected,) = run_on_ranks(train_llama, 1, single, 1, corpus, document_causal=True, timeout=300)
    assert expected["losses"] != pytest.approx(plain["losses"], rel=1e-4)  # the mask matters
    params = DeviceParameters(
        context_parallel=2, dp_shard=1, context_parallel_config={"rotate_method": "alltoall"}
    )
    for result in run_on_ranks(
        train_llama, 2, params, 1, corpus, document_causal=True, timeout=300
    ):
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=1e-5, atol=0
        )


class ValidatingLlama3Trainer(Llama3Trainer):
    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "val_loss" in metrics:
            self.val_losses.append(metrics["val_loss"])


def validate_llama(params: DeviceParameters, dp_size: int, corpus: dict[str, str]) -> list[float]:
    os.environ["DREAM_TRAINER_CACHE"] = corpus["cache"]
    config = tiny_config(params, dp_size, corpus["data"])
    config.training_parameters = TrainingParameters(
        max_steps=4, val_every_n_steps=2, val_steps_per_epoch=2
    )
    trainer = ValidatingLlama3Trainer(config)
    trainer.val_losses = []
    trainer.fit()
    return trainer.val_losses


def test_validation_under_pipeline_parallelism_matches_one_process(corpus):
    (expected,) = run_on_ranks(
        validate_llama, 1, DeviceParameters.SINGLE_DEVICE(), 1, corpus, timeout=300
    )
    params = LAYOUTS["pp2_1f1b"][1]
    for losses in run_on_ranks(validate_llama, 2, params, 1, corpus, timeout=300):
        assert len(losses) == 2
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)


def tiny_run_args(corpus: dict[str, str], run_dir: Path) -> list[str]:
    """Command-line arguments for a tiny, fast run of train.py on the test corpus."""
    model = ["--config", "debug", "--model_overrides", json.dumps(TINY)]
    return [
        *model,
        "--seq_len",
        "32",
        "--batch_size",
        "2",
        "--data",
        corpus["data"],
        "--run_dir",
        str(run_dir),
    ]


def test_train_script_runs_under_torchrun_and_prints_a_sample(corpus, tmp_path):
    overrides = [
        *tiny_run_args(corpus, tmp_path),
        "--training_parameters.max_steps",
        "30",
        "--training_parameters.val_every_n_steps",
        "15",
        "--logging_parameters.log_every_n_steps",
        "5",
        "--sample_tokens",
        "8",
    ]
    env = {"DREAM_TRAINER_CACHE": corpus["cache"]}
    result = run_torchrun(
        [str(REPO / "examples/llama3/train.py"), *overrides], nproc=2, timeout=300, env=env
    )
    output = result.stdout + result.stderr
    assert "sample after 30 steps" in output
    lines = [
        json.loads(x)
        for x in (tmp_path / "llama3/debug/latest/metrics.jsonl").read_text().splitlines()
    ]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert [x["step"] for x in lines if "val_loss" in x] == [15, 30]
    assert all(x["val_perplexity"] > 1 for x in lines if "val_loss" in x)


def test_train_script_applies_command_line_overrides_with_tensor_parallel(corpus, tmp_path):
    overrides = [
        *tiny_run_args(corpus, tmp_path),
        "--device_parameters.tensor_parallel",
        "2",
        "--device_parameters.loss_parallel",
        "true",
        "--training_parameters.max_steps",
        "4",
        "--training_parameters.val_every_n_steps",
        "4",
        "--logging_parameters.log_every_n_steps",
        "2",
        "--sample_tokens",
        "4",
    ]
    env = {"DREAM_TRAINER_CACHE": corpus["cache"]}
    result = run_torchrun(
        [str(REPO / "examples/llama3/train.py"), *overrides], nproc=2, timeout=300, env=env
    )
    output = result.stdout + result.stderr
    assert "tp                2  [0, 1]" in output
    assert "sample after 4 steps" in output


def test_a_misspelled_override_names_the_field(corpus, tmp_path):
    with pytest.raises(AssertionError, match="did you mean 'tensor_parallel'"):
        run_torchrun(
            [str(REPO / "examples/llama3/train.py"), "--device_parameters.tensor_paralel", "2"],
            nproc=1,
            timeout=120,
            env={"DREAM_TRAINER_CACHE": corpus["cache"]},
        )


def test_unknown_preset_lists_the_presets():
    from examples.llama3.presets import preset

    with pytest.raises(ValueError, match="debug, 1B, 3B, 8B, 70B, 405B"):
        preset("7B", Llama3Config)


@pytest.mark.parametrize("name", ["debug", "1B", "8B", "405B"])
def test_every_preset_builds_a_valid_config(name):
    from examples.llama3.presets import preset

    config = preset(name, Llama3Config)
    assert (
        config.model == name
        and Llama3Config.model_validate_json(config.model_dump_json()) == config
    )


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="torchrun tests rely on Linux process handling")
