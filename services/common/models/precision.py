"""Whether a model computes in bf16 or in float32, for a `precision` of `auto`, `bf16` or `fp32`.

bf16 pays where the hardware multiplies bf16 matrices natively: every CUDA GPU, CPUs with Intel AMX
tiles, where a student's output layer multiplies about five times faster than in float32, and CPUs with
AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake), where the demo's student trains about
1.8 times faster and its teacher decodes about 1.5 times faster. Elsewhere a CPU emulates bf16 and is
slower than float32, so `auto` keeps float32 there.
"""

from __future__ import annotations

import torch

from stillhouse.common.jobspec import Precision

BF16_CPU_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles or AVX512-BF16 dot products. torch exposes the CPU's capabilities only through these
    private probes; a torch without them is treated as a CPU without the units."""
    probes = (getattr(torch.cpu, name, None) for name in BF16_CPU_PROBES)
    return any(bool(probe()) for probe in probes if probe is not None)


def computes_in_bf16(precision: Precision, device: torch.device) -> bool:
    if precision is Precision.FP32:
        return False
    return precision is Precision.BF16 or device.type == "cuda" or cpu_has_bf16_matrix_units()


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if computes_in_bf16(precision, device) else torch.float32
