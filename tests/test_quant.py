"""Our CPU NF4 quantizer is bitsandbytes' own, bit for bit; dequantization reproduces what its matmul multiplies by."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora_pipe.model import NF4
from qlora_pipe.quant import (
    dequantize_fp32,
    merge_nf4_rows,
    nf4_codes_cpu,
    nf4_layer,
    quantize_nf4,
    trained_weight_fp32,
)

QUANT = {**NF4, "load_dtype": "bfloat16"}


def cases() -> list[torch.Tensor]:
    torch.manual_seed(0)
    spiky = torch.randn(256, 512)
    spiky[3, :64] = 0  # an all-zero block
    spiky[7, 5] = 1e4  # an outlier
    return [
        torch.randn(1100, 4096).to(torch.bfloat16) * 0.02,
        spiky,
        torch.rand(1000, 130),  # a partial last block
        torch.randn(77, 63).half(),  # odd number of elements
        torch.linspace(-1, 1, 64 * 64).reshape(64, 64),  # values on and around the NF4 midpoints
    ]


@pytest.mark.parametrize("weight", cases(), ids=lambda w: f"{tuple(w.shape)}-{w.dtype}")
def test_cpu_codes_equal_bitsandbytes(weight):
    expected_codes, expected_absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight, 64, "nf4", torch.uint8)
    codes, absmax = nf4_codes_cpu(weight, 64)
    assert torch.equal(codes, expected_codes) and torch.equal(absmax, expected_absmax)


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_nf4_equals_library_quantize_4bit(double_quant):
    weight = cases()[0]
    settings = {**QUANT, "double_quant": double_quant}
    packed, state = quantize_nf4(weight, settings, torch.device("cpu"))
    ref_packed, ref_state = bnb.functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    assert torch.equal(packed, ref_packed)
    assert torch.equal(dequantize_fp32(packed, state), dequantize_fp32(ref_packed, ref_state))


def test_nf4_layer_outputs_equal_x_times_dequantized_weight():
    weight = cases()[0][:256].float()
    layer = nf4_layer(weight, QUANT, torch.device("cpu"))
    x = torch.randn(5, weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ trained_weight_fp32(layer).T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("load_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fused_row_merge_equals_dequantize_then_add(load_dtype, double_quant, out_dtype):
    torch.manual_seed(0)
    settings = {**QUANT, "load_dtype": load_dtype, "double_quant": double_quant}
    for shape in [(300, 4096), (40, 11008), (64, 128)]:
        weight = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
        delta = torch.randn(*shape) * 1e-3
        expected = (trained_weight_fp32(nf4_layer(weight.float(), settings, torch.device("cpu"))) + delta).to(
            out_dtype
        )
        assert torch.equal(merge_nf4_rows(weight, settings, delta, out_dtype), expected)
