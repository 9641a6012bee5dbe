"""How blocks compute: activation checkpointing and float8 matmuls (fields of DeviceParameters)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from dream_trainer.configs.base import ConfigModel


class ActivationCheckpointConfig(ConfigModel):
    """What ``checkpoint_activations=True`` recomputes in backward."""

    mode: Literal["full", "selective"] = "full"
    """``full``: keep only each checkpointed block's inputs and rerun the whole block in
    backward (least memory, one extra forward). ``selective``: also keep the outputs of matrix
    multiplies, attention and the tensor-parallel reduce-scatter, and rerun only the cheap
    elementwise ops (norms, activations, RoPE): memory between none and full, little extra
    compute."""
    every_n_blocks: PositiveInt = 1
    """Checkpoint blocks ``0, N, 2N, ...`` of each model (a pipeline stage counts its own
    blocks); the others keep all their activations."""


Float8Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]


class Float8Config(ConfigModel):
    """torchao float8 training options (used when ``float8=True``; ``pip install
    'dream-trainer[fp8]'``)."""

    recipe: Float8Recipe = "tensorwise"
    """torchao's scaling recipe: ``tensorwise`` (one scale per tensor, the fastest, and the only
    one with float8 all-gathers), ``rowwise`` (one scale per row, more accurate) or
    ``rowwise_with_gw_hp`` (rowwise; weight gradients in high precision)."""
    enable_fsdp_float8_all_gather: bool = False
    """Cast weights to float8 before FSDP's all-gather (half the bytes of bf16); needs FSDP
    (``dp_shard x context_parallel > 1``) and the ``tensorwise`` recipe."""
    float8_tensor_parallel: bool | None = None
    """Under tensor parallelism, cast activations to float8 before the all-gathers (torchao's
    float8 TP styles); ``False``: communicate in the compute dtype and cast after. ``None``:
    on for ``tensorwise``, off for the rowwise recipes (torchao's float8 TP styles are
    tensorwise). gloo cannot all-gather float8, so on CPU set ``False``."""
    precompute_fsdp_scales: bool = False
    """With the float8 all-gather: after each optimizer step, compute every float8 weight's
    scale at once (one all-reduce for all of them, torchao's
    ``precompute_float8_dynamic_scale_for_fsdp``) instead of one all-reduce per weight inside
    FSDP's all-gather. Same scales, fewer collectives."""
    emulate: bool = False
    """Emulate the float8 matmul in high precision (same float8 rounding of its inputs): for
    GPUs without float8 kernels (before compute capability 8.9), and for CPUs, whose float8
    matmul in torch is a slow reference kernel."""
    exclude_modules: list[str] = Field(default_factory=list)
    """``nn.Linear`` modules to keep in high precision: names as in ``named_modules()`` or
    ``fnmatch`` patterns, e.g. ``["output", "layers.*.attention.wk"]``."""

    @model_validator(mode="after")
    def _all_gather_is_tensorwise(self) -> Float8Config:
        if self.enable_fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(
                "float8_config.enable_fsdp_float8_all_gather=True needs recipe='tensorwise' "
                f"(one scale per weight), got recipe={self.recipe!r}; use tensorwise or turn "
                "the float8 all-gather off"
            )
        if self.precompute_fsdp_scales and not self.enable_fsdp_float8_all_gather:
            raise ValueError(
                "float8_config.precompute_fsdp_scales=True precomputes the scales of the float8 "
                "all-gather, which is off; set enable_fsdp_float8_all_gather=True as well, or "
                "turn precompute_fsdp_scales off"
            )
        if self.float8_tensor_parallel and self.recipe != "tensorwise":
            raise ValueError(
                "float8_config.float8_tensor_parallel=True needs recipe='tensorwise' (torchao's "
                f"float8 tensor-parallel styles scale per tensor), got recipe={self.recipe!r}; "
                "set float8_tensor_parallel=False or None"
            )
        return self

    def uses_float8_tensor_parallel(self) -> bool:
        """``float8_tensor_parallel`` with ``None`` resolved from the recipe."""
        if self.float8_tensor_parallel is None:
            return self.recipe == "tensorwise"
        return self.float8_tensor_parallel
