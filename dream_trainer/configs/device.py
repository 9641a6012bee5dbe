"""How a run is laid out on devices: parallel degrees, precision and communication options."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PositiveInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from dream_trainer.configs.auto_layout import AutoLayout
from dream_trainer.configs.base import ConfigModel, DType
from dream_trainer.configs.compute import ActivationCheckpointConfig, Float8Config
from dream_trainer.configs.guide_forms import GUIDE_KEYS, SIZE_ALIASES, translate_guide_forms


def _parse_degree(value: Any, symbols: tuple[str, ...] = ("auto",)) -> int | str:
    if value in symbols:
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    names = " or ".join(repr(s) for s in symbols)
    raise ValueError(f"a degree must be a positive integer or {names}, got {value!r}")


Degree = Annotated[
    int | Literal["auto"],
    BeforeValidator(_parse_degree),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}),
]
"""A parallel degree: a positive int, or ``"auto"`` (whatever the world size leaves over)."""

ShardDegree = Annotated[
    int | Literal["auto", "node"],
    BeforeValidator(lambda value: _parse_degree(value, ("auto", "node"))),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"enum": ["auto", "node"]}]}),
]
"""The ``dp_shard`` degree: a :data:`Degree`, or ``"node"``: the ranks of one node divided by
``context_parallel x tensor_parallel``, which sit inside it."""


DEGREE_FIELDS = (
    "pipeline_parallel",
    "dp_replicate",
    "dp_shard",
    "context_parallel",
    "tensor_parallel",
)
"""Degree fields in mesh order (outermost first): ``pp, dp_replicate, dp_shard, cp, tp``."""

_DEFAULT_DEGREES: dict[str, int | str] = {name: 1 for name in DEGREE_FIELDS} | {"dp_shard": "auto"}

# torch.distributed.pipelining schedule names (matched case-insensitively, as torch does).
PIPELINE_SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)


class CommParameters(ConfigModel):
    """Collective-communication timeouts and the flight recorder."""

    init_timeout_seconds: float = Field(default=600.0, gt=0)
    """Timeout for starting the process group and the first collectives (setup can be slow)."""
    train_timeout_seconds: float = Field(default=300.0, gt=0)
    """Timeout for collectives once training runs; a hung rank fails after this long."""
    flight_recorder_buffer_size: int = Field(default=0, ge=0)
    """Entries kept by torch's flight recorder (NCCL's, and gloo's where torch has it) for hang
    forensics; 0 turns it off."""
    hang_watchdog: bool = True
    """Watch each rank during ``fit`` (more than one rank only): a rank that makes no progress
    for ``hang_timeout_seconds``, or a collective that fails, gets a report naming the ranks that
    did not arrive, and the job exits non-zero. See docs/hangs.md."""
    hang_timeout_seconds: float | None = None
    """Seconds a rank may stay in one phase (no new batch, step or phase) before it counts as
    hung; ``None`` means ``train_timeout_seconds``. A phase's first run in a fit (a first step
    that compiles) and checkpoint saves may take ``init_timeout_seconds`` if that is longer."""

    @field_validator("hang_timeout_seconds")
    @classmethod
    def _positive_hang_timeout(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(
                f"hang_timeout_seconds must be a positive number of seconds, got {value!r}; use "
                "None for train_timeout_seconds, or hang_watchdog=False to turn the watchdog off"
            )
        return value

    @property
    def effective_hang_timeout_seconds(self) -> float:
        """``hang_timeout_seconds``, or ``train_timeout_seconds`` where it is ``None``."""
        if self.hang_timeout_seconds is None:
            return self.train_timeout_seconds
        return self.hang_timeout_seconds


SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
"""Schedules that run one stage per rank; the others run ``stages_per_rank`` (2 by default)."""
V_SHAPED_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
"""Schedules that place stages ``r`` and ``2p - 1 - r`` on rank ``r`` (exactly 2 per rank)."""


class PipelineParallelConfig(ConfigModel):
    """Pipeline schedule options (used when ``pipeline_parallel > 1``)."""

    num_microbatches: PositiveInt | None = None
    """Microbatches each batch is split into; ``None`` means one per pipeline stage."""
    schedule: str = "1F1B"
    """A ``torch.distributed.pipelining`` schedule name (case-insensitive): GPipe, 1F1B,
    Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV."""
    stages_per_rank: PositiveInt | None = None
    """Stages each rank holds; ``None``: 1 for GPipe and 1F1B, 2 for the other schedules.
    ZBVZeroBubble and DualPipeV need exactly 2."""
    split_points: list[list[str]] | None = None
    """Explicit stages: for each stage, the module names (as in ``named_modules``) it holds, e.g.
    ``[["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]``; ``None`` balances the
    blocks automatically."""
    first_stage_weight: float = Field(default=1.0, ge=0)
    """How many blocks the modules before the blocks (the embedding) count as when balancing."""
    last_stage_weight: float = Field(default=1.0, ge=0)
    """How many blocks the modules after the blocks (final norm and head) count as."""

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        by_lower = {name.lower(): name for name in PIPELINE_SCHEDULES}
        if value.lower() not in by_lower:
            raise ValueError(
                f"unknown pipeline schedule {value!r}; use one of: {', '.join(PIPELINE_SCHEDULES)}"
            )
        return by_lower[value.lower()]

    @model_validator(mode="after")
    def _stages_fit_the_schedule(self) -> PipelineParallelConfig:
        n = self.stages_per_rank
        if n is not None and n != 2 and self.schedule in V_SHAPED_SCHEDULES:
            raise ValueError(
                f"schedule {self.schedule!r} places exactly 2 stages on each rank (V-shaped), "
                f"but stages_per_rank={n}; set stages_per_rank=2 or leave it unset"
            )
        if n is not None and n > 1 and self.schedule in SINGLE_STAGE_SCHEDULES:
            raise ValueError(
                f"schedule {self.schedule!r} runs one stage per rank, but stages_per_rank={n}; "
                "use Interleaved1F1B, LoopedBFS or InterleavedZeroBubble for several stages "
                "per rank, or set stages_per_rank=1"
            )
        return self

    def resolved_stages_per_rank(self) -> int:
        """``stages_per_rank``, or the schedule's default when it is unset."""
        if self.stages_per_rank is not None:
            return self.stages_per_rank
        return 1 if self.schedule in SINGLE_STAGE_SCHEDULES else 2


class ContextParallelConfig(ConfigModel):
    """Context-parallel attention options (used when ``context_parallel > 1``)."""

    rotate_method: Literal["allgather", "alltoall"] = "allgather"
    """How key/value shards travel between CP ranks."""
    load_balance: bool = True
    """Give each CP rank a head chunk and a tail chunk so causal attention work is even."""


class DeviceParameters(ConfigModel):
    """Parallel degrees and per-device options.

    Degrees multiply to the world size; at most one may be ``"auto"`` and takes what is left
    when the world starts. With ``auto_layout`` (``DeviceParameters.auto()``, or the string
    ``"auto"``) the launch chooses the degrees. Building this object never reads the environment.
    """

    pipeline_parallel: Degree = 1
    """Pipeline stages the model is split into (outermost mesh dimension)."""
    dp_replicate: Degree = 1
    """Data-parallel replicas holding the whole model (DDP; the outer dimension of HSDP)."""
    dp_shard: ShardDegree = "auto"
    """Data-parallel ranks sharding parameters, gradients and optimizer state (FSDP2)."""
    context_parallel: Degree = 1
    """Ranks splitting each sequence (context parallelism)."""
    tensor_parallel: Degree = 1
    """Ranks splitting each weight matrix (tensor parallelism, innermost mesh dimension)."""

    param_dtype: DType | None = None
    """Dtype of parameters in forward/backward (FSDP mixed precision); ``None`` keeps their dtype."""
    reduce_dtype: DType | None = None
    """Dtype of gradient reduction; ``None`` uses ``param_dtype``."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state on the CPU."""
    reshard_after_forward: bool = True
    """FSDP frees gathered parameters after forward, except the root's, which backward needs
    first (``False``: keep every module's until backward)."""
    compile_model: bool = False
    """Run the ``apply_compile`` hook (``torch.compile``)."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend of the default ``apply_compile``; ``aot_eager`` traces and
    differentiates the same graphs without generating code (quick to compile, for debugging)."""
    checkpoint_activations: bool = False
    """Run the ``apply_activation_checkpointing`` hook (``activation_checkpoint_config`` says
    how: full or selective recomputation, and which blocks)."""
    float8: bool = False
    """Train ``nn.Linear`` layers with float8 matmuls through torchao (the
    ``apply_float8_training`` hook; options in ``float8_config``; ``pip install
    'dream-trainer[fp8]'``)."""
    loss_parallel: bool = False
    """With tensor parallelism, compute the loss on vocab-sharded logits."""
    async_tensor_parallel: bool = False
    """Overlap TP communication with compute (needs ``compile_model`` and CUDA)."""

    extra_keys_accepted = GUIDE_KEYS

    comm: CommParameters = Field(default_factory=CommParameters)
    pipeline_parallel_config: PipelineParallelConfig = Field(default_factory=PipelineParallelConfig)
    context_parallel_config: ContextParallelConfig = Field(default_factory=ContextParallelConfig)
    activation_checkpoint_config: ActivationCheckpointConfig = Field(
        default_factory=ActivationCheckpointConfig
    )
    float8_config: Float8Config = Field(default_factory=Float8Config)
    auto_layout: AutoLayout | None = None
    """Choose ``dp_replicate``, ``dp_shard`` and ``tensor_parallel`` at launch from the world
    size, the device memory and the model's size (see ``DeviceParameters.auto``); ``None``:
    the degrees above are the layout. On the command line: ``--device_parameters auto``, then
    options such as ``--device_parameters.auto_layout.device_memory 80GiB``."""

    @classmethod
    def translate_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Map the guide forms (``*_parallel_size``, ``data_parallel_size``, ``fsdp_config``)."""
        if any(key in data for key in cls.extra_keys_accepted):
            return translate_guide_forms(dict(data))
        return data

    @model_validator(mode="before")
    @classmethod
    def _accept_guide_forms(cls, data: Any) -> Any:
        return cls.translate_aliases(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _options_of_features_that_are_on(self) -> DeviceParameters:
        # Options for a feature left off would be ignored without a word.
        for options, switch in (
            ("activation_checkpoint_config", "checkpoint_activations"),
            ("float8_config", "float8"),
        ):
            value = getattr(self, options)
            if not getattr(self, switch) and value != type(value)():
                raise ValueError(
                    f"{options} is set ({value!r}) but {switch}=False, so it would have no "
                    f"effect; set {switch}=True or drop {options}"
                )
        return self

    @model_validator(mode="after")
    def _at_most_one_auto(self) -> DeviceParameters:
        autos = [name for name in DEGREE_FIELDS if getattr(self, name) == "auto"]
        if len(autos) > 1:
            raise ValueError(
                f"at most one degree may be 'auto', got {len(autos)}: {', '.join(autos)}. "
                "Give all but one of them a number."
            )
        return self

    @model_validator(mode="after")
    def _auto_layout_chooses_the_degrees(self) -> DeviceParameters:
        if self.auto_layout is None:
            return self
        given = [
            f"{name}={value!r}"
            for name, value in self.degrees().items()
            if value != _DEFAULT_DEGREES[name]
        ]
        if given:
            raise ValueError(
                "the automatic layout (auto_layout) chooses dp_replicate, dp_shard and "
                "tensor_parallel itself and uses no pipeline or context parallelism, but "
                f"{', '.join(given)} was given. Drop those degrees, or drop auto_layout and "
                "give the layout yourself."
            )
        return self

    shorthands = ("auto",)

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """``"auto"``: the automatic layout with default options (the degrees reset)."""
        if value == "auto":
            return {**_DEFAULT_DEGREES, "auto_layout": {}}
        return None

    def degrees(self) -> dict[str, int | Literal["auto", "node"]]:
        """The five degrees by field name, in mesh order."""
        return {name: getattr(self, name) for name in DEGREE_FIELDS}

    # Presets. Each accepts any other field as a keyword.

    @classmethod
    def auto(cls, **kwargs: Any) -> DeviceParameters:
        """The layout chosen at launch: single device, DDP, HSDP, FSDP or FSDP x TP.

        Keywords are :class:`~dream_trainer.configs.AutoLayout` options (``device_memory``,
        ``parameter_count``, ``activation_reserve``, ...) or other fields of this class
        (``param_dtype``, ``compile_model``, ...); the degrees are not: they are chosen.
        """
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in AutoLayout.model_fields}
        return cls(**{**_DEFAULT_DEGREES, "auto_layout": options, **kwargs})

    @classmethod
    def SINGLE_DEVICE(cls, **kwargs: Any) -> DeviceParameters:
        """One process, no parallelism."""
        return cls._preset({name: 1 for name in DEGREE_FIELDS}, kwargs)

    @classmethod
    def DDP(
        cls,
        compile_model: bool = False,
        checkpoint_activations: bool = False,
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> DeviceParameters:
        """Replicate the model on every rank; gradients are all-reduced."""
        defaults = {**{name: 1 for name in DEGREE_FIELDS}, "dp_replicate": "auto"}
        options = dict(
            compile_model=compile_model,
            checkpoint_activations=checkpoint_activations,
            cpu_offload=cpu_offload,
        )
        return cls._preset({**defaults, **options}, kwargs)

    @classmethod
    def FSDP(
        cls,
        tensor_parallel: int | Literal["auto"] = 1,
        dp_shard: int | Literal["auto"] = "auto",
        compile_model: bool = False,
        cpu_offload: bool = False,
        checkpoint_activations: bool = False,
        **kwargs: Any,
    ) -> DeviceParameters:
        """Shard parameters, gradients and optimizer state over ``dp_shard`` ranks (FSDP2)."""
        defaults: dict[str, Any] = {name: 1 for name in DEGREE_FIELDS}
        options = dict(
            tensor_parallel=tensor_parallel,
            dp_shard=dp_shard,
            compile_model=compile_model,
            cpu_offload=cpu_offload,
            checkpoint_activations=checkpoint_activations,
        )
        return cls._preset({**defaults, **options}, kwargs)

    @classmethod
    def HSDP(
        cls,
        dp_shard: int | Literal["node"] = "node",
        dp_replicate: int | Literal["auto"] = "auto",
        tensor_parallel: int | Literal["auto"] = 1,
        compile_model: bool = False,
        cpu_offload: bool = False,
        checkpoint_activations: bool = False,
        **kwargs: Any,
    ) -> DeviceParameters:
        """Shard within groups of ``dp_shard`` ranks, replicate across groups.

        The default ``dp_shard="node"`` shards over the ranks of one node (less the
        tensor- and context-parallel ranks inside it) and replicates across nodes.
        """
        defaults: dict[str, Any] = {name: 1 for name in DEGREE_FIELDS}
        options = dict(
            dp_shard=dp_shard,
            dp_replicate=dp_replicate,
            tensor_parallel=tensor_parallel,
            compile_model=compile_model,
            cpu_offload=cpu_offload,
            checkpoint_activations=checkpoint_activations,
        )
        return cls._preset({**defaults, **options}, kwargs)

    @classmethod
    def _preset(cls, defaults: dict[str, Any], kwargs: dict[str, Any]) -> DeviceParameters:
        # A guide-form keyword (tensor_parallel_size=..., data_parallel_size=..., fsdp_config=...)
        # replaces the preset's value for the degrees it sets instead of conflicting with it.
        replaced = {SIZE_ALIASES[key] for key in kwargs if key in SIZE_ALIASES}
        if "data_parallel_size" in kwargs or "fsdp_config" in kwargs:
            replaced |= {"dp_replicate", "dp_shard"}
        kept = {name: value for name, value in defaults.items() if name not in replaced}
        return cls(**{**kept, **kwargs})
