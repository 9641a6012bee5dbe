"""The parallelism guide's forms of a layout, translated onto DeviceParameters' fields.

``*_parallel_size`` are the degree fields under another name; ``data_parallel_size`` with
``fsdp_config`` (a sharding strategy, mixed precision, CPU offload, a shard size) says how the
data-parallel ranks split into ``dp_replicate`` and ``dp_shard``. A guide form and the field it
sets may both be given only when they agree.
"""

from __future__ import annotations

from typing import Any

SIZE_ALIASES = {
    "pipeline_parallel_size": "pipeline_parallel",
    "tensor_parallel_size": "tensor_parallel",
    "context_parallel_size": "context_parallel",
}
"""Guide names of the degree fields."""

GUIDE_KEYS = frozenset(["data_parallel_size", "fsdp_config", *SIZE_ALIASES])
"""Every key :func:`translate_guide_forms` takes."""

_SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
_FSDP_CONFIG_KEYS = ("sharding_strategy", "mixed_precision", "cpu_offload", "shard_size")


def translate_guide_forms(data: dict[str, Any]) -> dict[str, Any]:
    """Map ``*_parallel_size``, ``data_parallel_size`` and ``fsdp_config`` onto canonical fields."""
    for alias, field in SIZE_ALIASES.items():
        if alias in data:
            _set_once(data, field, data.pop(alias), alias)
    if "data_parallel_size" not in data and "fsdp_config" not in data:
        return data

    fsdp = data.pop("fsdp_config", None) or {}
    if not isinstance(fsdp, dict):
        raise ValueError(f"fsdp_config must be a dict, got {type(fsdp).__name__}")
    unknown = sorted(set(fsdp) - set(_FSDP_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"fsdp_config has unknown keys {unknown}; accepted keys: {', '.join(_FSDP_CONFIG_KEYS)}"
        )
    strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in _SHARDING_STRATEGIES:
        raise ValueError(
            f"fsdp_config.sharding_strategy={fsdp['sharding_strategy']!r} is unknown; "
            f"use one of: {', '.join(_SHARDING_STRATEGIES)}"
        )
    dp_size = data.pop("data_parallel_size", "auto")
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        _set_once(data, "dp_shard", dp_size, "data_parallel_size")
        _set_once(data, "dp_replicate", 1, "fsdp_config.sharding_strategy")
        if strategy == "SHARD_GRAD_OP":
            _set_once(data, "reshard_after_forward", False, "fsdp_config.sharding_strategy")
    elif strategy == "NO_SHARD":
        _set_once(data, "dp_replicate", dp_size, "data_parallel_size")
        _set_once(data, "dp_shard", 1, "fsdp_config.sharding_strategy")
    else:  # HYBRID_SHARD: shard inside a group (usually a node), replicate across groups.
        shard_size = fsdp.get("shard_size")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(
                "fsdp_config.sharding_strategy='HYBRID_SHARD' needs fsdp_config.shard_size, the "
                "number of ranks that shard one replica (usually the GPUs per node), e.g. "
                "fsdp_config={'sharding_strategy': 'HYBRID_SHARD', 'shard_size': 8}"
            )
        replicate: int | str = "auto"
        if dp_size != "auto":
            if not isinstance(dp_size, int) or dp_size % shard_size:
                raise ValueError(
                    f"data_parallel_size={dp_size} is not a multiple of "
                    f"fsdp_config.shard_size={shard_size}; HYBRID_SHARD needs "
                    "data_parallel_size = replicas x shard_size"
                )
            replicate = dp_size // shard_size
        _set_once(data, "dp_shard", shard_size, "fsdp_config.shard_size")
        _set_once(data, "dp_replicate", replicate, "data_parallel_size")
    if fsdp.get("mixed_precision"):
        _set_once(data, "param_dtype", "bfloat16", "fsdp_config.mixed_precision")
        _set_once(data, "reduce_dtype", "float32", "fsdp_config.mixed_precision")
    if "cpu_offload" in fsdp:
        _set_once(data, "cpu_offload", bool(fsdp["cpu_offload"]), "fsdp_config.cpu_offload")
    return data


def _set_once(data: dict[str, Any], field: str, value: Any, source: str) -> None:
    if field in data and data[field] != value:
        raise ValueError(
            f"{source} sets {field}={value!r}, but {field}={data[field]!r} was also given; "
            "give only one of them"
        )
    data[field] = value
