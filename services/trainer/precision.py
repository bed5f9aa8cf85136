"""The precision a training forward pass runs in: bf16 autocast over float32 weights, or plain float32.

bf16 pays where the hardware multiplies bf16 matrices natively: every CUDA GPU training is meant for,
CPUs with Intel AMX tiles, where a student's output layer multiplies about five times faster than in
float32, and CPUs with AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake), where the
demo's student trains about 1.8 times faster. Elsewhere a CPU emulates bf16 and is slower than float32,
so `auto` keeps float32 there.
"""

from __future__ import annotations

import contextlib

import torch

from stillhouse.common.jobspec import Precision

BF16_CPU_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles or AVX512-BF16 dot products. torch exposes the CPU's capabilities only through these
    private probes; a torch without them is treated as a CPU without the units."""
    probes = (getattr(torch.cpu, name, None) for name in BF16_CPU_PROBES)
    return any(bool(probe()) for probe in probes if probe is not None)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass autocasts to, or None for plain float32."""
    if precision is Precision.FP32:
        return None
    if precision is Precision.BF16 or device.type == "cuda" or cpu_has_bf16_matrix_units():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_label(dtype: torch.dtype | None) -> str:
    return "bf16 autocast, float32 weights" if dtype is torch.bfloat16 else "float32"
