"""Llama 3 model shapes by name: a CPU-sized ``debug`` config and the published 1B-405B shapes."""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from dream_trainer.launch import TransformerShape


class RopeScaling(BaseModel):
    """Llama 3.1 RoPE frequency scaling (long-context extension of a model trained at 8192)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_factor: float = Field(default=8.0, gt=0)
    low_freq_factor: float = Field(default=1.0, gt=0)
    high_freq_factor: float = Field(default=4.0, gt=0)
    original_max_position_embeddings: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _check_factors(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor}); swap or fix the two values."
            )
        return self


class LlamaArgs(BaseModel):
    """Every shape and numeric choice of a Llama 3 transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    multiple_of: int = Field(default=256, gt=0)
    ffn_dim_multiplier: float | None = Field(default=None, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=500000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = Field(default=8192, gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> LlamaArgs:
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                "change one of them so every head has the same width."
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention; change n_kv_heads."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings; "
                "change dim or n_heads."
            )
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def transformer_shape(self, seq_len: int, batch_size: int) -> TransformerShape:
        """The shape ``dream-trainer plan`` estimates activations from (a ``TransformerShape``)."""
        from dream_trainer.launch import TransformerShape

        return TransformerShape(
            dim=self.dim,
            ffn_dim=self.ffn_hidden_dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            seq_len=seq_len,
            batch_size=batch_size,
        )


_SCALING_3_1 = RopeScaling(scale_factor=8.0)
_SCALING_3_2 = RopeScaling(scale_factor=32.0)
_LLAMA3_VOCAB = 128256

# Published shapes (Llama 3.2 1B/3B, Llama 3.1 8B/70B/405B); parameter counts are checked in
# tests/test_llama3_model.py against the published numbers.
_CONFIGS: dict[str, dict[str, Any]] = {
    # 4,000,000 parameters; the vocabulary matches the default byte-level BPE tokenizer (tokenizer.py).
    "debug": dict(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=2048,
        multiple_of=64,
        max_seq_len=256,
    ),
    "1B": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_LLAMA3_VOCAB,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_scaling=_SCALING_3_2,
        tie_embeddings=True,
    ),
    "3B": dict(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=_LLAMA3_VOCAB,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_scaling=_SCALING_3_2,
        tie_embeddings=True,
    ),
    "8B": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_LLAMA3_VOCAB,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=_SCALING_3_1,
    ),
    "70B": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=_LLAMA3_VOCAB,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=_SCALING_3_1,
    ),
    "405B": dict(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=_LLAMA3_VOCAB,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=_SCALING_3_1,
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_CONFIGS)


def get_model_args(name: str, **overrides: Any) -> LlamaArgs:
    """Return the named config, with ``overrides`` (e.g. ``max_seq_len=4096``) validated on top."""
    if name not in _CONFIGS:
        raise ValueError(
            f"Unknown Llama 3 config name {name!r}; choose one of {', '.join(MODEL_NAMES)}."
        )
    return LlamaArgs.model_validate({**_CONFIGS[name], **overrides})


def check_model_overrides(
    overrides: dict[str, Any], reserved: dict[str, str] | None = None
) -> None:
    """Raise unless every key of ``overrides`` names a LlamaArgs field not in ``reserved``.

    ``reserved`` maps fields set elsewhere to the option that sets them (e.g. max_seq_len ->
    seq_len), so the error can point there.
    """
    reserved = reserved or {}
    fields = sorted(set(LlamaArgs.model_fields) - set(reserved))
    for key in overrides:
        if key in reserved:
            raise ValueError(
                f"model_overrides.{key} is set from {reserved[key]}; drop it from model_overrides "
                f"and pass {reserved[key]} instead."
            )
    unknown = [str(key) for key in overrides if key not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"model_overrides has no LlamaArgs field {', '.join(hints)}; "
            f"its fields are: {', '.join(fields)}."
        )


def describe_override_errors(error: ValidationError) -> str:
    """LlamaArgs validation errors as ``model_overrides.<field> (<value>): <message>; ...``."""
    parts = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ").rstrip(".")
        field = ".".join(str(part) for part in item["loc"])
        parts.append(
            f"model_overrides.{field} ({item['input']!r}): {message}" if field else message
        )
    return "; ".join(parts) + "."


def check_tensor_parallel_degree(args: LlamaArgs, tp: int) -> None:
    """Raise unless the tensor-parallel degree ``tp`` splits the attention heads evenly."""
    if args.n_heads % tp == 0 and args.n_kv_heads % tp == 0:
        return
    # n_kv_heads divides n_heads (checked by LlamaArgs), so the degrees that work divide it.
    degrees = [d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
    raise ValueError(
        f"Tensor-parallel degree {tp} must divide both n_heads ({args.n_heads}) and n_kv_heads "
        f"({args.n_kv_heads}) so every rank holds whole attention heads; set "
        f"device_parameters.tensor_parallel to one of {', '.join(map(str, degrees))}, or change "
        "n_heads / n_kv_heads with model_overrides."
    )
