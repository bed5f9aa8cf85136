"""bf16 or float32: bf16 where the hardware multiplies bf16 natively, unless a spec says otherwise."""

from __future__ import annotations

import pytest
import torch

from stillhouse.common.jobspec import Precision
from stillhouse.common.models import precision
from stillhouse.common.models.model_loading import ModelSource, load_scoring_model
from stillhouse.common.models.precision import compute_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("has_units", [True, False])
def test_auto_computes_in_bf16_on_a_gpu_and_on_a_cpu_with_bf16_units_only(monkeypatch, has_units):
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: has_units)
    assert compute_dtype(Precision.AUTO, CUDA) is torch.bfloat16
    assert compute_dtype(Precision.AUTO, CPU) is (torch.bfloat16 if has_units else torch.float32)
    assert compute_dtype(Precision.BF16, CPU) is torch.bfloat16
    assert compute_dtype(Precision.FP32, CUDA) is torch.float32


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_amx_tiles_or_avx512_bf16_count_as_bf16_matrix_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert precision.cpu_has_bf16_matrix_units() is expected


def test_a_torch_without_the_probes_means_no_bf16_units(monkeypatch):
    for name in precision.BF16_CPU_PROBES:
        monkeypatch.delattr(torch.cpu, name)
    assert precision.cpu_has_bf16_matrix_units() is False


def test_a_local_teacher_model_loads_in_the_precision_asked(tmp_path, tiny_llama):
    source = ModelSource(tiny_llama(tmp_path / "teacher"))
    float32 = load_scoring_model(source, CPU, Precision.FP32)
    assert (float32.dtype, float32.lm_head.weight.dtype) == (torch.float32, torch.float32)
    bf16 = load_scoring_model(source, CPU, Precision.BF16)
    assert (bf16.dtype, bf16.lm_head.weight.dtype) == (torch.bfloat16, torch.bfloat16)
