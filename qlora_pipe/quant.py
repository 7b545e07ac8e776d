"""NF4 reproduction: the weight bitsandbytes multiplied by during training, rebuilt from the original checkpoint.

bitsandbytes' 4-bit matmul dequantizes straight into the compute dtype: NF4 code × block scale, computed in fp32 and
cast once. So the fp32 dequantization is exact, and casting it to bf16 gives what a bf16 run multiplied by
(dequantizing via the stored dtype first would round twice).
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch


def dequantize_fp32(packed: torch.Tensor, state) -> torch.Tensor:
    """fp32 dequantization of an NF4 weight, as bitsandbytes' gemm_4bit computes it."""
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(packed, state)


def nf4_layer(weight: torch.Tensor, quantization: dict, device: torch.device) -> bnb.nn.Linear4bit:
    """The Linear4bit training had for this (out, in) weight: cast to the load dtype (it sets the block scales), then
    quantized by bitsandbytes' own Params4bit with the recorded settings, exactly as transformers loads it.
    Computes in fp32 on the dequantize-and-matmul path, so its outputs are exact references."""
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.float32,
        compress_statistics=quantization["double_quant"],
        quant_type=quantization["quant_type"],
        quant_storage=getattr(torch, quantization["quant_storage"]),
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(getattr(torch, quantization["load_dtype"])).contiguous(),
        requires_grad=False,
        blocksize=quantization["blocksize"],
        compress_statistics=quantization["double_quant"],
        quant_type=quantization["quant_type"],
        quant_storage=getattr(torch, quantization["quant_storage"]),
        module=layer,
    )
    layer = layer.to(device)
    layer.support_avx512bf16_for_cpu = False
    return layer


def trained_weight_fp32(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The (out, in) weight the layer multiplies by, in fp32, on the CPU."""
    return dequantize_fp32(layer.weight.data, layer.weight.quant_state).cpu()
