"""Values of a ``formats.quantized.QuantizedTensor``, by its scheme, as its reference loader
computes them (see each function). Imported only when values are asked for: it needs torch.
"""

from __future__ import annotations

import torch

from ..errors import FormatError
from . import bnb4
from .dequant import dequantize
from .ggml_types import BY_NAME


def decode(tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``tensor`` as a new tensor of ``dtype``."""
    return _SCHEMES[tensor.scheme](tensor, dtype)


def decode_rows(tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of ``tensor``'s values: from just their bytes where each row is
    whole blocks of its own (GGUF) or shares the tensor's one scale (fp8), else cut from
    the whole tensor's values."""
    row = tensor.numel // tensor.shape[0] if tensor.shape[0] else 0
    shape = (stop - start, *tensor.shape[1:])
    if tensor.scheme == "gguf" and row % tensor.block_size == 0:
        size = row // tensor.block_size * BY_NAME[tensor.qtype].type_size
        raw = tensor.parts["data"].load()[start * size:stop * size]
        return dequantize(raw, tensor.qtype, shape, dtype)
    if tensor.scheme == "fp8-scaled" and tensor.parts["scale"].numel == 1:
        stored = tensor.parts["data"].read_rows(start, stop)
        return (stored.to(dtype) * tensor.parts["scale"].read()).to(dtype)
    return decode(tensor, dtype)[start:stop]


def _gguf(tensor, dtype):
    """ggml's block formats (``dequant``), from the mapped file: no private copy of the
    blocks, only the values made from them."""
    return dequantize(tensor.parts["data"].load(), tensor.qtype, tensor.shape, dtype)


def _fp8_scaled(tensor, dtype):
    """ComfyUI's ``TensorCoreFP8Layout.dequantize``: the fp8 values cast to the output type,
    times the float32 scale (a scalar, or any shape that broadcasts over the weight)."""
    stored = tensor.parts["data"].read()
    scale = tensor.parts["scale"].read()
    if scale.numel() != 1 and scale.dim() > stored.dim():
        raise FormatError(f"a scale of shape {list(scale.shape)} does not fit a weight of shape "
                          f"{list(stored.shape)}")
    try:
        return (stored.to(dtype) * scale).to(dtype)
    except RuntimeError:
        raise FormatError(f"a scale of shape {list(scale.shape)} does not fit a weight of "
                          f"shape {list(stored.shape)}") from None


def _bnb_4bit(tensor, dtype):
    """bitsandbytes' 4-bit layout: two codes a byte (the first in the high nibble), each an
    index into the 16-value ``quant_map``, times its block's absmax; with double quantisation
    the absmax are themselves 8-bit codes into ``nested_quant_map`` times their block's
    ``nested_absmax``, plus ``nested_offset``. Computed in float32, rounded once."""
    parts, params = tensor.parts, tensor.params
    packed = parts["data"].read().reshape(-1)
    quant_map = parts["quant_map"].read().float().reshape(-1)
    absmax = parts["absmax"].read().reshape(-1)
    if "nested_absmax" in parts:
        absmax = bnb4.expand_absmax(absmax, parts["nested_absmax"].read().float().reshape(-1),
                                    params["nested_offset"],
                                    parts["nested_quant_map"].read().float().reshape(-1),
                                    params["nested_blocksize"])
    values = bnb4.decode(packed, quant_map, absmax.float(), params["blocksize"], tensor.numel)
    return values.reshape(tensor.shape).to(dtype)


_SCHEMES = {"gguf": _gguf, "fp8-scaled": _fp8_scaled, "bnb-4bit": _bnb_4bit}
