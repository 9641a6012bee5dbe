"""Bad Llama 3 example settings fail when the config is built, naming the field and the fix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dream_trainer.configs import apply_overrides
from examples.llama3.configs import check_tensor_parallel_degree, get_model_args
from examples.llama3.presets import preset
from examples.llama3.train import Llama3Config, Llama3Trainer


def override(*argv: str) -> Llama3Config:
    """The ``debug`` preset with command-line overrides, as train.py builds it."""
    return apply_overrides(preset("debug", Llama3Config), list(argv))


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("seq_len", "0", "greater than or equal to 1"),
        ("batch_size", "0", "greater than or equal to 1"),
        ("lr", "-1", "greater than 0"),
        ("lr", "0", "greater than 0"),
        ("min_lr_ratio", "1.5", "less than or equal to 1"),
        ("min_lr_ratio", "-0.1", "greater than or equal to 0"),
        ("warmup_steps", "-1", "greater than or equal to 0"),
        ("weight_decay", "-0.1", "greater than or equal to 0"),
        ("sample_tokens", "-1", "greater than or equal to 0"),
    ],
)
def test_out_of_range_values_name_the_users_field(field: str, value: str, bound: str) -> None:
    with pytest.raises(ValidationError) as error:
        override(f"--{field}", value)
    (problem,) = error.value.errors()
    assert problem["loc"] == (field,) and bound in problem["msg"]
    assert "max_seq_len" not in str(error.value)


def test_boundary_values_are_accepted() -> None:
    config = override(
        *("--min_lr_ratio", "0", "--warmup_steps", "0", "--weight_decay", "0"),
        *("--sample_tokens", "0", "--seq_len", "1", "--batch_size", "1"),
    )
    assert (config.min_lr_ratio, config.warmup_steps, config.seq_len) == (0, 0, 1)
    assert override("--min_lr_ratio", "1").min_lr_ratio == 1


def test_a_misspelled_model_override_suggests_the_field() -> None:
    with pytest.raises(ValidationError) as error:
        override("--model_overrides.n_layer", "2")
    (problem,) = error.value.errors()
    assert problem["loc"] == ("model_overrides",)
    message = problem["msg"]
    assert "model_overrides has no LlamaArgs field 'n_layer' (did you mean 'n_layers'?)" in message
    assert "its fields are: dim, ffn_dim_multiplier, multiple_of, n_heads, n_kv_heads" in message
    assert "max_seq_len" not in message  # set through seq_len, so not offered
    assert override("--model_overrides.n_layers", "2").model_overrides == {"n_layers": 2}


def test_max_seq_len_in_model_overrides_points_to_seq_len() -> None:
    with pytest.raises(ValidationError, match=r"model_overrides\.max_seq_len is set from seq_len"):
        override("--model_overrides.max_seq_len", "64")


def test_an_invalid_model_shape_fails_when_the_config_is_built() -> None:
    with pytest.raises(ValidationError) as error:
        override("--model_overrides.n_kv_heads", "3")
    message = str(error.value)
    assert "model 'debug' with model_overrides {'n_kv_heads': 3} is not a valid" in message
    assert "n_heads (8) must be a multiple of n_kv_heads (3)" in message
    with pytest.raises(ValidationError, match=r"model_overrides\.dim \(-64\): Input should be"):
        override("--model_overrides.dim", "-64")


def test_an_unknown_model_name_lists_the_names() -> None:
    with pytest.raises(ValidationError) as error:
        override("--model", "7B")
    (problem,) = error.value.errors()
    assert problem["loc"] == ("model",)
    assert "model '7B' is unknown; choose one of debug, 1B, 3B, 8B, 70B, 405B." in problem["msg"]


def test_tensor_parallel_degree_must_divide_the_head_counts() -> None:
    args = get_model_args("debug")  # 8 heads, 4 kv heads
    for tp in (1, 2, 4):
        check_tensor_parallel_degree(args, tp)
    for tp in (3, 8):  # 8 divides n_heads but not n_kv_heads
        with pytest.raises(ValueError) as error:
            check_tensor_parallel_degree(args, tp)
        message = str(error.value)
        asked = f"Tensor-parallel degree {tp} must divide both n_heads (8) and n_kv_heads (4)"
        assert asked in message
        assert "set device_parameters.tensor_parallel to one of 1, 2, 4" in message


def _configure(config: Llama3Config, tp_size: int, vocab_size: int) -> SimpleNamespace:
    """Run ``configure_models`` on a stand-in trainer: no ranks are launched."""
    trainer = SimpleNamespace(
        config=config,
        world=SimpleNamespace(tp_size=tp_size),
        tokenizer=SimpleNamespace(vocab_size=vocab_size),
    )
    Llama3Trainer.configure_models(trainer)  # type: ignore[arg-type]
    return trainer


def test_configure_models_checks_the_tensor_parallel_degree_and_vocabulary() -> None:
    config = override("--model_overrides", '{"dim": 64, "n_layers": 1, "multiple_of": 32}')
    with pytest.raises(ValueError, match=r"Tensor-parallel degree 3 must divide both n_heads"):
        _configure(config, tp_size=3, vocab_size=2048)
    with pytest.raises(ValueError) as error:
        _configure(config, tp_size=1, vocab_size=5000)
    message = str(error.value)
    assert "The tokenizer has 5000 ids but model 'debug' has a vocabulary of only 2048" in message
    assert "pass --model_overrides.vocab_size 5000" in message
    trainer = _configure(config, tp_size=2, vocab_size=2048)
    assert trainer.model.args.n_layers == 1 and trainer.model.args.max_seq_len == 128
