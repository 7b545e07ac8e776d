"""NF4 reproduction: the weight bitsandbytes multiplied by during training, rebuilt from the original checkpoint.

bitsandbytes' 4-bit matmul dequantizes straight into the compute dtype: NF4 code × block scale, computed in fp32 and
cast once. So the fp32 dequantization is exact, and casting it to bf16 gives what a bf16 run multiplied by
(dequantizing via the stored dtype first would round twice).
"""

from __future__ import annotations

import copy
from functools import cache

import bitsandbytes as bnb
import torch
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
from bitsandbytes.functional import QuantState, dequantize_blockwise, get_4bit_type, quantize_blockwise

CHUNK = 1 << 20  # elements per step of the CPU quantizer: a few MB, so each pass stays in cache


def dequantize_fp32(packed: torch.Tensor, state) -> torch.Tensor:
    """fp32 dequantization of an NF4 weight, as bitsandbytes' gemm_4bit computes it."""
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(packed, state)


@cache
def nf4_lookup(bounds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces torch.bucketize over the 15 NF4 midpoints, exactly. bucketize(x) counts the midpoints below x. Group
    the floats by their top 16 bits: each group is an interval [lo, hi] holding at most one midpoint (checked here),
    so the count is (midpoints below lo) + (x > the midpoint inside, if any)."""
    bits = torch.arange(1 << 16, dtype=torch.int32) << 16
    ends = torch.stack([bits.view(torch.float32), (bits | 0xFFFF).view(torch.float32)])
    lo, hi = ends.min(0).values, ends.max(0).values
    mids = torch.tensor(bounds)
    below = (mids.view(1, -1) < lo.view(-1, 1)).sum(1).to(torch.int32)
    inside = (mids.view(1, -1) >= lo.view(-1, 1)) & (mids.view(1, -1) < hi.view(-1, 1))
    finite = lo.isfinite() & hi.isfinite()
    if int(inside[finite].sum(1).max()) > 1:
        raise RuntimeError("two NF4 midpoints share a 16-bit float group; the lookup would be inexact")
    midpoint = torch.full((1 << 16,), float("inf"))
    rows, cols = inside.nonzero(as_tuple=True)
    midpoint[rows] = mids[cols]
    return below, midpoint


def nf4_midpoints(device: torch.device) -> torch.Tensor:
    return _get_4bit_quantize_bounds("nf4", device)[0]


def nf4_block_codes(block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Flat int32 NF4 codes of fp32 blocks (rows) with block maxima `scale`: bitsandbytes' scaling, step for step,
    then torch.bucketize over the midpoints by table lookup."""
    scaled = torch.clamp(block * (1.0 / scale.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    below, midpoint = nf4_lookup(tuple(nf4_midpoints(block.device).tolist()))
    group = (scaled.view(torch.int32) >> 16) & 0xFFFF
    return torch.index_select(below, 0, group) + (scaled > torch.index_select(midpoint, 0, group))


def nf4_codes_cpu(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU NF4 quantizer (its default `quantize_4bit` op), the same arithmetic step for step, ~3x faster:
    it runs in cache-sized chunks of whole blocks and looks the codes up instead of a binary search. Why our own: the
    library's op streams every 7B weight through memory several times and spends most of a merge in bucketize.
    Bit-for-bit equality with the library is a test."""
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    step = CHUNK - CHUNK % blocksize
    for start in range(0, full, step):
        stop = min(start + step, full)
        block = flat[start:stop].float().reshape(-1, blocksize)
        scale = block.abs().max(dim=-1)[0]
        absmax[start // blocksize : stop // blocksize] = scale
        q = nf4_block_codes(block, scale)
        packed[start // 2 : stop // 2] = ((q[::2] << 4) | q[1::2]).to(torch.uint8)
    if full < n:  # a last, partial block: the library divides instead of multiplying by the reciprocal
        tail = flat[full:].float()
        scale = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = scale
        scaled = torch.clamp(tail / scale, -1, 1)
        scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))
        q = torch.bucketize(scaled, nf4_midpoints(weight.device), out_int32=True).to(torch.uint8)
        packed[full // 2 :] = (q[::2] << 4) | q[1::2]
    return packed.unsqueeze(1), absmax


def double_quant_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
    """bitsandbytes' double quant of the block scales, and the scales its dequantization then multiplies by."""
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    scales = dequantize_blockwise(qabsmax, state2)
    scales += offset
    return qabsmax, offset, state2, scales.float()


def fused_merge_supported(weight: torch.Tensor, quantization: dict, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and quantization["quant_type"] == "nf4"
        and weight.shape[1] % quantization["blocksize"] == 0
    )


def merge_nf4_rows(
    weight: torch.Tensor, quantization: dict, delta: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """(NF4-dequantized weight + delta).to(out_dtype) for an (out, in) weight, in cache-sized chunks of rows.

    The same arithmetic as quantizing (nf4_codes_cpu), dequantizing (code × block scale in fp32, bitsandbytes'
    dequantize_4bit), adding PEFT's delta and casting, but never materialising the fp32 weight: a 7B merge spends
    its time here. Equality with the unfused path is a test."""
    blocksize = quantization["blocksize"]
    weight = weight.to(getattr(torch, quantization["load_dtype"]))
    rows = max(1, CHUNK // weight.shape[1])
    # |x| and max are exact in any float dtype and widening is monotone: the block maxima can be taken before the cast
    absmax = torch.cat([w.reshape(-1, blocksize).abs().amax(dim=-1).float() for w in weight.split(rows)])
    scales = double_quant_scales(absmax)[3] if quantization["double_quant"] else absmax
    code = get_4bit_type("nf4", device=weight.device)
    out = torch.empty(weight.shape, dtype=out_dtype)
    width = weight.shape[1]
    per_chunk = rows * weight.shape[1] // blocksize
    for i, start in enumerate(range(0, weight.shape[0], rows)):
        block = weight[start : start + rows].float().reshape(-1, blocksize)
        codes = nf4_block_codes(block, absmax[i * per_chunk : i * per_chunk + block.shape[0]])
        values = torch.index_select(code, 0, codes).view(-1, blocksize)
        merged = (values * scales[i * per_chunk : i * per_chunk + block.shape[0]].view(-1, 1)).reshape(-1, width)
        if delta is not None:
            merged += delta[start : start + rows]
        out[start : start + rows] = merged
    return out


def quantize_nf4(weight: torch.Tensor, quantization: dict, device: torch.device) -> tuple[torch.Tensor, QuantState]:
    """bitsandbytes.functional.quantize_4bit for NF4 (with its double quant of the block scales), using the fast exact
    CPU quantizer on the CPU and the library's kernel elsewhere."""
    if device.type != "cpu" or quantization["quant_type"] != "nf4":
        return bnb.functional.quantize_4bit(
            weight.to(device),
            blocksize=quantization["blocksize"],
            compress_statistics=quantization["double_quant"],
            quant_type=quantization["quant_type"],
            quant_storage=getattr(torch, quantization["quant_storage"]),
        )
    blocksize = quantization["blocksize"]
    packed, absmax = nf4_codes_cpu(weight, blocksize)
    storage = getattr(torch, quantization["quant_storage"])
    if storage != torch.uint8:
        packed = packed.squeeze().view(storage).unsqueeze(1)
    code = get_4bit_type("nf4", device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type="nf4")
    if not quantization["double_quant"]:
        return packed, QuantState(absmax=absmax, **common)
    qabsmax, offset, state2, _ = double_quant_scales(absmax)
    return packed, QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def nf4_layer(weight: torch.Tensor, quantization: dict, device: torch.device) -> bnb.nn.Linear4bit:
    """The Linear4bit training had for this (out, in) weight: cast to the load dtype (it sets the block scales), then
    quantized as bitsandbytes quantizes it when transformers loads the base, with the recorded settings. Computes in
    fp32 on the dequantize-and-matmul path, so its outputs are exact references."""
    out_features, in_features = weight.shape
    storage = getattr(torch, quantization["quant_storage"])
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.float32,
        compress_statistics=quantization["double_quant"],
        quant_type=quantization["quant_type"],
        quant_storage=storage,
        device="meta",
    )
    packed, state = quantize_nf4(
        weight.to(getattr(torch, quantization["load_dtype"])).contiguous(), quantization, device
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=quantization["blocksize"],
        compress_statistics=quantization["double_quant"],
        quant_type=quantization["quant_type"],
        quant_storage=storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.support_avx512bf16_for_cpu = False
    return layer


def trained_weight_fp32(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The (out, in) weight the layer multiplies by, in fp32, on the CPU."""
    return dequantize_fp32(layer.weight.data, layer.weight.quant_state).cpu()
