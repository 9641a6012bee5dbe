"""Model FLOPs per token, achieved TFLOP/s and MFU against a table of vendor peak figures.

A model declares its training FLOPs per token with a ``flops_per_token`` attribute (a number) or
method (called with no arguments); the trainer's ``flops_per_token()`` hook sums what its models
declare and may be overridden. *Training FLOPs* means forward plus backward, counting a
multiply-add as 2 FLOPs, for one token of the sequence length trained on (the usual ``6N`` plus
an attention term; see ``examples/llama3/model.py`` for one exact definition).

MFU (model FLOPs utilization) = achieved model FLOP/s per device / the device's peak. Peaks are
dense (no 2:4 sparsity) BF16 tensor-core figures from the vendors' datasheets, looked up by the
name the device reports. An unlisted device, and the CPU, has no peak here: no MFU is reported
rather than a guess. Runs in FP32/TF32 are still measured against the BF16 peak.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from numbers import Real

import torch
from torch import nn

# (pattern searched in the device name, case-insensitive; dense BF16 FLOP/s). First match wins,
# so specific variants come before the family. Sources, as the vendors state them:
# * NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core 1,979 TFLOPS
#   (SXM), 1,513 (PCIe), 1,671 (NVL), all "with sparsity": dense is half.
# * NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 1,979 TFLOPS (SXM), 1,671
#   (NVL), with sparsity. GH200 (nvidia.com/en-us/data-center/grace-hopper-superchip): the
#   H100 SXM figure, 1,979 with sparsity.
# * NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 Tensor Core 312 TFLOPS dense
#   (624 with sparsity) for the 40 GB and 80 GB, PCIe and SXM boards alike.
# * NVIDIA Blackwell datasheet (HGX B200 / GB200 NVL72): FP16/BF16 Tensor Core 36 PFLOPS per 8
#   B200 and 360 PFLOPS per 72 GB200, with sparsity: 2.25 and 2.5 PFLOPS dense per GPU.
# * NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity); L4: 242 with
#   sparsity; A10: 125 (250 with sparsity).
# * AMD Instinct MI300X / MI325X product pages (amd.com): peak BF16 1,307.4 TFLOPS dense
#   (2,614.9 with sparsity); MI250X: 383 TFLOPS.
# Deliberately absent: NVIDIA A10G (AWS's variant of the A10: no NVIDIA datasheet gives its
# tensor-core peak, and third-party figures disagree), consumer cards, any device not listed.
# Override the trainer's ``peak_flops_per_device()`` to supply a figure you trust.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 1979e12 / 2),
    (r"\bH200\b.*\bNVL\b", 1671e12 / 2),
    (r"\bH200\b", 1979e12 / 2),
    (r"\bH100\b.*\bNVL\b", 1671e12 / 2),
    (r"\bH100\b.*\bPCIe\b", 1513e12 / 2),
    (r"\bH100\b.*\b(SXM|HBM3)", 1979e12 / 2),  # SXM boards report e.g. "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312e12),  # A100-SXM4-40GB, A100-SXM4-80GB, A100-PCIE-40GB, A100 80GB PCIe
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),
    (r"\bMI300X\b", 1307.4e12),
    (r"\bMI325X\b", 1307.4e12),
    (r"\bMI250X\b", 383e12),
    (r"\bL40S\b", 362.05e12),
    (r"\bL4\b", 242e12 / 2),
    (r"\bA10\b", 125e12),  # not "A10G" (no word boundary before the G)
)


def peak_flops_for_name(name: str) -> float | None:
    """Dense BF16 peak FLOP/s of the device called ``name``, or None when it is not listed."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def device_name(device: torch.device) -> str | None:
    """The name the accelerator reports (e.g. ``NVIDIA H100 80GB HBM3``); None on the CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None  # ROCm devices are "cuda" too; other accelerators have no table entries
    return str(torch.cuda.get_device_name(device))


def peak_flops_for(device: torch.device) -> float | None:
    """Dense BF16 peak FLOP/s of ``device``; None for the CPU and unlisted devices."""
    name = device_name(device)
    return None if name is None else peak_flops_for_name(name)


def declared_flops_per_token(models: Iterable[nn.Module]) -> float | None:
    """Sum of the ``flops_per_token`` the models declare (attribute or no-argument method).

    None when no model declares one. Pass one module per model (the trainer passes
    ``named_models()``): a declaration is the whole model's count, even on a pipeline stage.
    """
    seen: dict[int, float] = {}
    for model in models:
        declared = getattr(model, "flops_per_token", None)
        if declared is None:
            continue
        value = declared() if callable(declared) else declared
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(
                f"{type(model).__name__}.flops_per_token gave {value!r}; it must be a number "
                "(training FLOPs per token: forward + backward)"
            )
        seen[id(model)] = float(value)
    return sum(seen.values()) if seen else None


def flops_metrics(
    tokens_per_s_per_device: float,
    flops_per_token: float,
    peak_flops: float | None,
    prefix: str = "train/",
) -> dict[str, float]:
    """``tflops_per_device`` = FLOPs per token x tokens/s per device / 1e12; ``mfu`` with a peak."""
    achieved = flops_per_token * tokens_per_s_per_device
    out = {f"{prefix}tflops_per_device": achieved / 1e12}
    if peak_flops is not None and peak_flops > 0:
        out[f"{prefix}mfu"] = achieved / peak_flops
    return out
