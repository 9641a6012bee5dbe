"""Asynchronous tensor parallelism (inductor overlaps TP collectives with matmuls)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Let torch.compile overlap TP collectives with matmuls (symmetric memory on the TP group)."""
    try:
        from torch._inductor import config as inductor_config
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError as error:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            "async_tensor_parallel=True needs torch.distributed._symmetric_memory, which this "
            "torch build lacks; set async_tensor_parallel=False"
        ) from error
    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
