"""Options of the automatic layout: what the launch measures, and what it assumes."""

from __future__ import annotations

from pydantic import ByteSize, Field, model_validator

from dream_trainer.configs.base import ConfigModel


class AutoLayout(ConfigModel):
    """What ``DeviceParameters.auto()`` decides from; the device and model fields left ``None``
    are measured at launch.

    The layout is chosen when the world launches (``dream_trainer.world.choose_layout``):
    single device, DDP, HSDP, FSDP or FSDP x TP, whichever is first to fit the device's budget,
    ``device_memory x (1 - activation_reserve)``.
    """

    device_memory: ByteSize | None = None
    """Memory of one device, in bytes or as ``"80GiB"`` / ``"80GB"``; ``None``: the CUDA
    device's total memory, or on the CPU the physical RAM divided by the ranks on the node."""
    parameter_count: int | None = Field(default=None, ge=1)
    """Parameters of all models together; ``None``: counted by running ``configure_models`` on
    the meta device at launch."""
    trainable_count: int | None = Field(default=None, ge=0)
    """Of those, the trainable ones (they get gradients and optimizer state); ``None``: counted,
    or ``parameter_count`` when that is given."""
    bytes_per_parameter: float | None = Field(default=None, gt=0)
    """Bytes of one stored parameter (and of its gradient); ``None``: measured, or 4 (fp32)
    when ``parameter_count`` is given."""
    largest_block_parameters: int | None = Field(default=None, ge=0)
    """Parameters of the largest unit FSDP gathers at once (a block, or what the model root
    holds outside its blocks); ``None``: measured, or 0 (not counted) when ``parameter_count``
    is given."""
    optimizer_bytes_per_parameter: float = Field(default=8.0, ge=0)
    """Optimizer state per trainable parameter; 8 is AdamW's two fp32 states (SGD without
    momentum: 0)."""
    activation_reserve: float = Field(default=0.25, ge=0, lt=1)
    """Share of device memory kept free for activations, temporary buffers and fragmentation;
    the rest is the budget for parameters, gradients and optimizer state."""
    activation_memory: ByteSize | None = None
    """Activations of one micro-batch on one device without tensor parallelism, if known; it is
    counted against the budget, divided by the tensor-parallel degree. ``None``: covered by
    ``activation_reserve`` alone."""
    allow_tensor_parallel: bool = True
    """May choose tensor parallelism (it is chosen only for a model with a tensor-parallel plan,
    or a trainer that overrides ``apply_tensor_parallel``)."""

    @model_validator(mode="after")
    def _counts_agree(self) -> AutoLayout:
        total, trainable = self.parameter_count, self.trainable_count
        if total is not None and trainable is not None and trainable > total:
            raise ValueError(
                f"trainable_count={trainable} is larger than parameter_count={total}; the "
                "trainable parameters are a part of all parameters"
            )
        block = self.largest_block_parameters
        if total is not None and block is not None and block > total:
            raise ValueError(
                f"largest_block_parameters={block} is larger than parameter_count={total}; a "
                "block is a part of the model"
            )
        return self
