"""Config validation: every bad input names its field; presets and guide forms mean what they say."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

from dream_trainer.configs import (
    CommParameters,
    ContextParallelConfig,
    DeviceParameters,
    PipelineParallelConfig,
    TrainingParameters,
)


def error_text(**kwargs: object) -> str:
    with pytest.raises(ValidationError) as info:
        DeviceParameters(**kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "must_mention"),
    [
        ({"dp_shard": 0}, ["dp_shard", "positive integer or 'auto' or 'node'", "0"]),
        ({"tensor_parallel": -2}, ["tensor_parallel", "-2"]),
        ({"pipeline_parallel": "two"}, ["pipeline_parallel", "'two'"]),
        ({"context_parallel": True}, ["context_parallel", "True"]),
        ({"param_dtype": "int8"}, ["param_dtype", "'int8'", "bfloat16"]),
        ({"reduce_dtype": 3}, ["reduce_dtype", "3"]),
        ({"tensor_paralel": 2}, ["tensor_paralel", "did you mean 'tensor_parallel'"]),
        ({"pipeline_parallel_config": {"schedule": "2F2B"}}, ["schedule", "2F2B", "1F1B"]),
        ({"pipeline_parallel_config": {"num_microbatches": 0}}, ["num_microbatches"]),
        ({"context_parallel_config": {"rotate_method": "ring"}}, ["rotate_method", "allgather"]),
        ({"comm": {"init_timeout_seconds": 0}}, ["init_timeout_seconds"]),
        ({"comm": {"flight_recorder": 10}}, ["flight_recorder", "flight_recorder_buffer_size"]),
        ({"dp_shard": "auto", "tensor_parallel": "auto"}, ["dp_shard", "tensor_parallel", "auto"]),
    ],
)
def test_bad_device_parameters_name_the_field_and_value(kwargs, must_mention):
    text = error_text(**kwargs)
    for fragment in must_mention:
        assert fragment in text, f"{fragment!r} missing from:\n{text}"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val"),
        ({"val_every_n_steps": 0}, "val_every_n_steps"),
        ({"on_non_finite_grad": "ignore"}, "on_non_finite_grad"),
        ({"epochs": 3}, "did you mean 'n_epochs'"),
    ],
)
def test_bad_training_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        TrainingParameters(**kwargs)


def test_unreachable_max_steps_is_an_error():
    with pytest.raises(ValidationError, match="max_steps=10 can never be reached"):
        TrainingParameters(n_epochs=1, train_steps_per_epoch=5, max_steps=10)


def test_dtype_accepts_objects_and_names_and_serializes_to_names():
    assert DeviceParameters(param_dtype=torch.bfloat16).param_dtype is torch.bfloat16
    assert DeviceParameters(param_dtype="bfloat16").param_dtype is torch.bfloat16
    assert DeviceParameters(param_dtype="torch.float16").param_dtype is torch.float16
    dumped = DeviceParameters(param_dtype="bf16", reduce_dtype=torch.float32).model_dump(
        mode="json"
    )
    assert (dumped["param_dtype"], dumped["reduce_dtype"]) == ("bfloat16", "float32")


def test_degrees_accept_numeric_strings_from_the_command_line():
    assert DeviceParameters(tensor_parallel="4").tensor_parallel == 4


@pytest.mark.parametrize(
    "config",
    [
        DeviceParameters(),
        DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2, param_dtype="bfloat16"),
        DeviceParameters.HSDP(dp_shard=4, cpu_offload=True, reduce_dtype="float32"),
        DeviceParameters(pipeline_parallel=2, pipeline_parallel_config={"schedule": "gpipe"}),
        TrainingParameters(n_epochs=3, gradient_clip_val=1.0, max_steps=7),
        CommParameters(train_timeout_seconds=12.5),
        ContextParallelConfig(rotate_method="alltoall"),
    ],
)
def test_json_round_trip_is_exact(config):
    text = config.model_dump_json()
    again = type(config).model_validate_json(text)
    assert again == config
    assert again.model_dump_json() == text


def test_presets_set_their_layout():
    assert DeviceParameters.SINGLE_DEVICE().degrees() == dict.fromkeys(
        ["pipeline_parallel", "dp_replicate", "dp_shard", "context_parallel", "tensor_parallel"], 1
    )
    ddp = DeviceParameters.DDP()
    assert (ddp.dp_replicate, ddp.dp_shard) == ("auto", 1)
    fsdp = DeviceParameters.FSDP(tensor_parallel=2)
    assert (fsdp.dp_replicate, fsdp.dp_shard, fsdp.tensor_parallel) == (1, "auto", 2)
    hsdp = DeviceParameters.HSDP(dp_shard=4)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == ("auto", 4)


def test_presets_accept_any_other_field():
    config = DeviceParameters.FSDP(dp_shard=2, param_dtype="float32", loss_parallel=True)
    assert config.param_dtype is torch.float32 and config.loss_parallel
    assert DeviceParameters.DDP(comm={"train_timeout_seconds": 5}).comm.train_timeout_seconds == 5


@pytest.mark.parametrize(
    "flags", list(itertools.product([False, True], repeat=3)), ids=lambda f: "-".join(map(str, f))
)
@pytest.mark.parametrize("preset", ["DDP", "FSDP", "HSDP", "SINGLE_DEVICE"])
def test_every_preset_option_combination_constructs(preset, flags):
    compile_model, checkpoint_activations, cpu_offload = flags
    extra = {"dp_shard": 2} if preset == "HSDP" else {}
    config = getattr(DeviceParameters, preset)(
        compile_model=compile_model,
        checkpoint_activations=checkpoint_activations,
        cpu_offload=cpu_offload,
        **extra,
    )
    assert (config.compile_model, config.checkpoint_activations, config.cpu_offload) == flags
    assert config.async_tensor_parallel is False


def test_guide_form_pipeline():
    config = DeviceParameters(
        pipeline_parallel_size=2,
        pipeline_parallel_config={"num_microbatches": 4, "schedule": "1F1B"},
    )
    assert config.pipeline_parallel == 2
    assert config.pipeline_parallel_config == PipelineParallelConfig(
        num_microbatches=4, schedule="1F1B"
    )


@pytest.mark.parametrize(
    ("strategy", "replicate", "shard", "reshard"),
    [
        ("FULL_SHARD", 1, 4, True),
        ("SHARD_GRAD_OP", 1, 4, False),
        ("NO_SHARD", 4, 1, True),
    ],
)
def test_guide_form_fsdp_config_strategies(strategy, replicate, shard, reshard):
    config = DeviceParameters(
        data_parallel_size=4, tensor_parallel_size=2, fsdp_config={"sharding_strategy": strategy}
    )
    assert (config.dp_replicate, config.dp_shard, config.tensor_parallel) == (replicate, shard, 2)
    assert config.reshard_after_forward is reshard


def test_guide_form_mixed_precision_means_bf16_params_fp32_reduce():
    config = DeviceParameters(
        data_parallel_size=2,
        tensor_parallel_size=2,
        fsdp_config={"sharding_strategy": "FULL_SHARD", "mixed_precision": True},
    )
    assert (config.param_dtype, config.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_guide_form_hybrid_shard_splits_replicas_and_shards():
    config = DeviceParameters(
        data_parallel_size=8, fsdp_config={"sharding_strategy": "HYBRID_SHARD", "shard_size": 4}
    )
    assert (config.dp_replicate, config.dp_shard) == (2, 4)
    with pytest.raises(ValidationError, match=r"needs fsdp_config\.shard_size"):
        DeviceParameters(data_parallel_size=8, fsdp_config={"sharding_strategy": "HYBRID_SHARD"})
    with pytest.raises(ValidationError, match=r"not a multiple of fsdp_config\.shard_size=3"):
        DeviceParameters(
            data_parallel_size=8, fsdp_config={"sharding_strategy": "HYBRID_SHARD", "shard_size": 3}
        )


def test_guide_form_pipeline_with_context_parallel():
    config = DeviceParameters(pipeline_parallel_size=2, context_parallel_size=2, dp_shard=1)
    assert (config.pipeline_parallel, config.context_parallel) == (2, 2)


def test_guide_form_conflicting_with_canonical_field_is_an_error():
    text = error_text(tensor_parallel_size=2, tensor_parallel=4)
    assert "tensor_parallel_size sets tensor_parallel=2" in text and "tensor_parallel=4" in text


def test_guide_form_unknown_fsdp_key_and_strategy():
    assert "accepted keys" in error_text(fsdp_config={"sharding": "FULL_SHARD"})
    assert "ZERO3" in error_text(fsdp_config={"sharding_strategy": "ZERO3"})


def test_preset_with_guide_form_degree_uses_the_guide_value():
    assert DeviceParameters.FSDP(tensor_parallel_size=2).tensor_parallel == 2
    ddp = DeviceParameters.DDP(data_parallel_size=4, fsdp_config={"sharding_strategy": "NO_SHARD"})
    assert (ddp.dp_replicate, ddp.dp_shard) == (4, 1)


def test_guide_forms_round_trip_to_canonical_json():
    config = DeviceParameters(data_parallel_size=2, tensor_parallel_size=2)
    text = config.model_dump_json()
    assert "tensor_parallel_size" not in text and "fsdp_config" not in text
    assert DeviceParameters.model_validate_json(text) == config


def test_user_subclasses_add_fields_and_keep_presets_and_strictness():
    class MyDevice(DeviceParameters):
        nvlink_domain: int = 8

    config = MyDevice.FSDP(dp_shard=2, nvlink_domain=4)
    assert isinstance(config, MyDevice) and config.nvlink_domain == 4
    assert MyDevice.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValidationError, match="nvlink_domian"):
        MyDevice(nvlink_domian=4)


def test_building_a_config_never_reads_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    assert DeviceParameters.FSDP().dp_shard == "auto"
    assert DeviceParameters() == DeviceParameters.model_validate_json(
        DeviceParameters().model_dump_json()
    )


def test_assignment_is_validated():
    config = DeviceParameters()
    with pytest.raises(ValidationError, match="tensor_parallel"):
        config.tensor_parallel = 0


# Command-line overrides


def test_parse_overrides_reads_dotted_keys_json_values_and_flags():
    from dream_trainer.configs import parse_overrides

    parsed = parse_overrides(
        [
            "--device_parameters.tensor_parallel",
            "2",
            "--experiment=run-2",
            "--flag",
            "--training_parameters.gradient_clip_val",
            "0.5",
            "--model_overrides",
            '{"dim": 64}',
        ]
    )
    assert parsed == {
        "device_parameters": {"tensor_parallel": 2},
        "experiment": "run-2",
        "flag": True,
        "training_parameters": {"gradient_clip_val": 0.5},
        "model_overrides": {"dim": 64},
    }


def test_parse_overrides_rejects_positional_values():
    from dream_trainer.configs import parse_overrides

    with pytest.raises(
        ValueError, match=r"expected an option like --field\.name VALUE, got 'debug'"
    ):
        parse_overrides(["debug"])


def test_apply_overrides_validates_and_keeps_other_fields():
    from dream_trainer.configs import DreamTrainerConfig, apply_overrides

    base = DreamTrainerConfig(project="p", device_parameters=DeviceParameters.FSDP(dp_shard=2))
    new = apply_overrides(base, ["--device_parameters.tensor_parallel", "2", "--seed", "5"])
    assert (new.project, new.seed, new.device_parameters.dp_shard) == ("p", 5, 2)
    assert (
        new.device_parameters.tensor_parallel == 2 and base.device_parameters.tensor_parallel == 1
    )
    with pytest.raises(ValidationError, match="did you mean 'tensor_parallel'"):
        apply_overrides(base, ["--device_parameters.tensor_paralel", "2"])
    with pytest.raises(ValidationError, match="max_steps"):
        apply_overrides(base, ["--training_parameters.max_steps", "0"])
