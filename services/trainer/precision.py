"""The precision a training forward pass runs in: bf16 autocast over float32 weights, or plain float32.

bf16 where the hardware multiplies bf16 matrices natively (`stillhouse.common.models.precision`).
"""

from __future__ import annotations

import contextlib

import torch

from stillhouse.common.jobspec import Precision
from stillhouse.common.models.precision import computes_in_bf16


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass autocasts to, or None for plain float32."""
    return torch.bfloat16 if computes_in_bf16(precision, device) else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_label(dtype: torch.dtype | None) -> str:
    return "bf16 autocast, float32 weights" if dtype is torch.bfloat16 else "float32"
