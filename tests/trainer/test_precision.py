"""The training forward pass's precision: bf16 autocast where the hardware multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch

from stillhouse.common.jobspec import Precision, TrainingSpec
from stillhouse.common.models import precision
from stillhouse.trainer.precision import autocast, autocast_dtype, precision_label

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("has_units", [True, False])
def test_auto_is_bf16_on_a_gpu_and_on_a_cpu_with_bf16_units_only(monkeypatch, has_units):
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: has_units)
    assert autocast_dtype(Precision.AUTO, CUDA) is torch.bfloat16
    assert autocast_dtype(Precision.AUTO, CPU) is (torch.bfloat16 if has_units else None)
    assert autocast_dtype(Precision.BF16, CPU) is torch.bfloat16
    assert autocast_dtype(Precision.FP32, CUDA) is None
    assert autocast_dtype(Precision.FP32, CPU) is None


def test_the_default_is_auto_and_the_label_says_what_ran():
    assert TrainingSpec().precision is Precision.AUTO
    assert precision_label(torch.bfloat16) == "bf16 autocast, float32 weights"
    assert precision_label(None) == "float32"


def test_bf16_autocast_keeps_float32_weights_and_gradients_close_to_float32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    inputs = torch.randn(16, 64)

    def gradient(dtype: torch.dtype | None) -> tuple[torch.dtype, torch.Tensor]:
        layer.zero_grad()
        with autocast(CPU, dtype):
            output = layer(inputs)
        output.float().square().mean().backward()
        return output.dtype, layer.weight.grad.clone()

    full_dtype, full = gradient(None)
    half_dtype, half = gradient(torch.bfloat16)
    assert (full_dtype, half_dtype) == (torch.float32, torch.bfloat16)
    assert layer.weight.dtype is torch.float32 and half.dtype is torch.float32
    assert not torch.equal(full, half)  # the product really ran in bf16
    assert torch.allclose(full, half, rtol=0.05, atol=1e-3)
