"""GGML blocks back to numbers: ``dequantize(raw, qtype, shape)``, vectorised in torch.

Each type's layout is ggml's (``ggml-quants.c``; the ``gguf`` package's numpy code reads the
same bytes, and the tests hold these functions to it). Every block type is unpacked over all
its blocks at once with shifts and masks, computed in float32 (as ggml and the ``gguf`` package
do) and cast to the asked dtype at the end; a big tensor is done a slice of blocks at a time,
so that the float32 intermediates stay a few MB whatever the tensor's size. The work is
done where ``raw`` is (CPU, or a GPU for a caller that put the blocks there).

Types without a torch kernel here (the grid-based IQ types, the ternary and FP4 types) are
dequantized by the ``gguf`` package's numpy code when it is installed, as ComfyUI-GGUF does.
"""

from __future__ import annotations

import math

import torch

from ..errors import FormatError
from .ggml_types import BY_NAME, QK_K, GGMLType

# Blocks per slice: 32,768 Q8_0 blocks are 1 M values, 4 MB of float32 per intermediate.
_SLICE_VALUES = 1 << 20


def dequantize(raw, qtype: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """The values of ``shape`` stored as GGML type ``qtype`` in ``raw`` (a uint8 tensor of the
    stored blocks, any shape), as a new tensor of ``dtype``."""
    kind = BY_NAME.get(qtype)
    if kind is None:
        raise FormatError(f"unknown GGML type {qtype!r}")
    numel = math.prod(shape)
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    expected = kind.nbytes(numel)
    if expected < 0 or flat.numel() != expected:
        raise FormatError(f"{flat.numel()} bytes of {qtype} cannot hold shape {list(shape)} "
                          f"(needs {expected if expected >= 0 else 'whole blocks of'} "
                          f"{'bytes' if expected >= 0 else kind.block_size})")
    if not kind.is_quantized:
        return _plain(flat, kind).reshape(shape).to(dtype)
    if flat.data_ptr() % 2:  # the float16 fields are read through an int16 view
        flat = flat.clone()
    blocks = flat.view(-1, kind.type_size)
    kernel = DEQUANTIZERS.get(qtype)
    if kernel is None:
        return _with_gguf(blocks, kind).reshape(shape).to(flat.device, dtype)
    step = max(1, _SLICE_VALUES // kind.block_size)
    if blocks.shape[0] <= step:  # one slice: its values are the result, with no copy
        return kernel(blocks).reshape(shape).to(dtype)
    out = torch.empty(numel, dtype=dtype, device=flat.device)
    for first in range(0, blocks.shape[0], step):
        part = blocks[first:first + step]
        values = kernel(part).reshape(-1)
        out[first * kind.block_size:first * kind.block_size + values.numel()] = values
    return out.reshape(shape)


def _plain(flat: torch.Tensor, kind: GGMLType) -> torch.Tensor:
    torch_type = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F64": torch.float64, "I8": torch.int8, "I16": torch.int16,
                  "I32": torch.int32, "I64": torch.int64}[kind.name]
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch_type)
    if flat.data_ptr() % kind.type_size:  # a view at an odd offset: copy to align
        flat = flat.clone()
    return flat.view(torch_type)


def _with_gguf(blocks: torch.Tensor, kind: GGMLType) -> torch.Tensor:
    try:
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize
    except ImportError:
        raise FormatError(f"cannot dequantize {kind.name} tensors without the gguf package "
                          "(pip install gguf)") from None
    values = gguf_dequantize(blocks.cpu().numpy().astype(np.uint8, copy=False),
                             GGMLQuantizationType(kind.id))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


# Helpers over a (blocks, type_size) uint8 tensor. ------------------------------------------

def _f16(blocks: torch.Tensor, at: int, count: int = 1) -> torch.Tensor:
    """``count`` float16 fields from byte ``at`` (even: every block type keeps its float16
    fields 2-aligned, in blocks of an even size) of each block, as float32 (blocks, count).
    Read through an int16 view of the blocks: a strided view, where copying the 2-byte
    columns out first cost a third of the whole dequantization."""
    halves = blocks.view(torch.int16)[:, at // 2:at // 2 + count]
    return halves.view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes (blocks, n) to 2n 4-bit codes: the n low nibbles, then the n high ones."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits(field: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Each value of ``field`` (blocks, n) split into ``count`` ``width``-bit codes, lowest
    first: (blocks, count, n)."""
    shifts = torch.arange(0, count * width, width, dtype=field.dtype,
                          device=field.device).view(1, count, 1)
    return (field.unsqueeze(1) >> shifts) & ((1 << width) - 1)


# Legacy 32-element blocks. ---------------------------------------------------------------

def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).float() + _f16(b, 2)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32 high bits of a Q5 block (4 bytes of a little-endian uint32, bit j for value
    j), as 0/16 (blocks, 32): bit planes of the bytes, in byte order."""
    return _bits(qh, 8, 1).transpose(1, 2).reshape(qh.shape[0], 32) << 4


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8])
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b):
    return b[:, 2:34].view(torch.int8).float().mul_(_f16(b, 0))


# K-quants: 256-element super-blocks of 16 or 8 sub-blocks with their own scales. ----------

def _q2_k(b):
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    # 64 bytes of 2-bit codes: two halves of 32 bytes, each read at shifts 0, 2, 4, 6.
    q = _bits(b[:, 16:80].reshape(n * 2, 32), 4, 2).reshape(n, 16, 16).float()
    sub_d = (d * (scales & 0x0F).float()).unsqueeze(2)
    sub_m = (dmin * (scales >> 4).float()).unsqueeze(2)
    return (sub_d * q - sub_m).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 6-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high), high 2 bits from
    # bytes 8-11 at shifts 0, 2, 4, 6.
    low = _nibbles(packed[:, 0:8])
    high = _bits(packed[:, 8:12], 4, 2).reshape(n, 16)
    scales = ((low | (high << 4)).float() - 32).unsqueeze(2)
    q = _bits(qs.reshape(n * 2, 32), 4, 2).reshape(n, 8, 32).to(torch.int16)
    # The high bit, one bit plane of hmask per group of 32; a clear bit means minus 4.
    h = _bits(hmask, 8, 1).to(torch.int16)
    values = (q - ((1 - h) << 2)).reshape(n, 16, 16).float()
    return (d.unsqueeze(2) * scales * values).reshape(n, QK_K)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 6-bit scales and 8 6-bit mins of a Q4_K/Q5_K block's 12 packed bytes."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat((first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)), dim=1)
    mins = torch.cat((second & 0x3F, (third >> 4) | ((second >> 6) << 4)), dim=1)
    return scale.float(), mins.float()


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    scale, mins = _k_scale_min(b[:, 4:16])
    # 4 chunks of 32 bytes: each chunk's low nibbles are one sub-block, its high the next.
    q = _bits(b[:, 16:144].reshape(n * 4, 32), 2, 4).reshape(n, 8, 32).float()
    return ((d * scale).unsqueeze(2) * q - (dmin * mins).unsqueeze(2)).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    scale, mins = _k_scale_min(b[:, 4:16])
    low = _bits(b[:, 48:176].reshape(n * 4, 32), 2, 4).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 8, 1)  # bit s of each qh byte belongs to sub-block s
    q = (low | (high << 4)).float()
    return ((d * scale).unsqueeze(2) * q - (dmin * mins).unsqueeze(2)).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16(b, 208)
    # Two halves of 128 values: 64 ql bytes (low nibbles, then high) and 32 qh bytes read
    # at shifts 0, 2, 4, 6, both in groups of 32.
    low = _bits(ql.reshape(n * 2, 64), 2, 4).reshape(n * 2, 4, 32)
    high = _bits(qh.reshape(n * 2, 32), 4, 2)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return ((d * scales).unsqueeze(2) * q).reshape(n, QK_K)


# Non-linear 4-bit: the codes index a fixed table of 16 levels. ---------------------------

_IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10,
                            1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)


def _iq4_nl(b):
    return _f16(b, 0) * _IQ4_LEVELS.to(b.device)[_nibbles(b[:, 2:18]).long()]


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    scales_h = b[:, 2:4].to(torch.int64)
    scales_h = scales_h[:, 0] | scales_h[:, 1] << 8
    low = _nibbles(b[:, 4:8])  # sub-block 2i in the low nibble of byte i, 2i+1 in its high
    low = torch.stack((low[:, :4], low[:, 4:]), dim=2).reshape(n, 8).to(torch.int64)
    high = (scales_h.unsqueeze(1) >> torch.arange(0, 16, 2, dtype=torch.int64,
                                                  device=b.device)) & 3
    scale = ((low | (high << 4)) - 32).float().unsqueeze(2)
    q = _bits(b[:, 8:136].reshape(n * 8, 16), 2, 4).reshape(n, 8, 32)
    return (d.unsqueeze(2) * scale * _IQ4_LEVELS.to(b.device)[q.long()]).reshape(n, QK_K)


# The types dequantized here, by name; the others go to the gguf package (``_with_gguf``).
DEQUANTIZERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}
