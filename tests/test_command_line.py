"""Command-line overrides: every malformed option is an error naming it; --help lists every field."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from dream_trainer.configs import (
    DreamTrainerConfig,
    OverrideError,
    apply_overrides,
    config_from_command_line,
    parse_overrides,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        ["--training_parameters.max_steps"],
        ["--training_parameters.max_steps", "--seed", "3"],
        ["--seed"],
    ],
)
def test_an_option_without_a_value_is_an_error_unless_the_field_is_boolean(args):
    with pytest.raises(OverrideError, match=rf"{args[0]} needs a value of type int"):
        apply_overrides(DreamTrainerConfig(), args)


def test_a_boolean_option_alone_means_true():
    config = apply_overrides(
        DreamTrainerConfig(), ["--device_parameters.compile_model", "--seed", "2"]
    )
    assert config.device_parameters.compile_model is True and config.seed == 2


@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_value_for_an_integer_or_float_field_is_an_error(value):
    with pytest.raises(OverrideError, match=r"max_steps is of type int \| null, so it cannot"):
        apply_overrides(DreamTrainerConfig(), ["--training_parameters.max_steps", value])
    with pytest.raises(OverrideError, match="gradient_clip_val is of type float"):
        apply_overrides(DreamTrainerConfig(), [f"--training_parameters.gradient_clip_val={value}"])


def test_negative_numbers_are_values_and_still_validated():
    with pytest.raises(ValidationError, match="gradient_clip_val"):
        apply_overrides(DreamTrainerConfig(), ["--training_parameters.gradient_clip_val", "-1"])
    config = apply_overrides(DreamTrainerConfig(), ["--seed", "-3"])
    assert config.seed == -3


def test_without_a_model_the_parser_keeps_the_flag_form():
    assert parse_overrides(["--a.b", "--c", "1"]) == {"a": {"b": True}, "c": 1}


def test_help_lists_every_field_with_type_default_and_docstring(capsys):
    config = DreamTrainerConfig(seed=9)
    with pytest.raises(SystemExit) as exit_info:
        config_from_command_line(config, ["--help"], program="train.py")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in (
        "--seed INT",
        "--training_parameters.max_steps int | null",
        "--device_parameters.compile_model BOOL",
        "--logging_parameters.wandb_mode",
    ):
        assert key in text, key
    assert "default: 9" in text  # the config's value, not the class default
    assert "Seeds torch's RNG" in text  # the field's docstring
    assert "Also accepts: context_parallel_size, data_parallel_size" in text
    assert sorted(line.split()[0] for line in text.splitlines() if line.startswith("  --")) == [
        f"--{key}" for key in sorted(leaf_keys(config))
    ]


def leaf_keys(model: BaseModel, prefix: str = "") -> list[str]:
    keys = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_a_bad_option_prints_one_line_naming_it_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_command_line(DreamTrainerConfig(), ["--training_parameters.max_steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "training_parameters.max_steps: Input should be greater than or equal to 1 (got 0)" in err
    )
    assert "Traceback" not in err


def test_llama3_help_lists_its_own_fields_and_exits_0():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples/llama3/train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for key in ("--lr FLOAT", "--seq_len INT", "--model_overrides dict", "--config {debug"):
        assert key in result.stdout, key
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "lr: Input should be greater than 0 (got -1)"),
        (["--seq_len", "0"], "seq_len: Input should be greater than or equal to 1 (got 0)"),
        (["--model_overrides.n_layer", "2"], "'n_layer' (did you mean 'n_layers'?)"),
        (["--training_parameters.max_steps"], "needs a value of type int | null"),
    ],
)
def test_llama3_bad_options_fail_before_launch_naming_the_field(args, message, monkeypatch, capsys):
    # The script runs as __main__ in this process (torch is imported already; the help test
    # above starts it as its own process): any exception but SystemExit(2) fails the test.
    monkeypatch.setattr(sys, "argv", [str(REPO / "examples/llama3/train.py"), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo root first
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(sys.argv[0], run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
