"""bitsandbytes' 4-bit blockwise format (NF4, FP4), both ways, in plain torch.

What ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` stores, from its
``QuantState`` and kernels (bitsandbytes 0.50): the flattened weight cut in blocks of 64
values (whatever its rows); each block's largest magnitude (``absmax``, float32); each value
times 1/absmax, clamped to [-1, 1], given the index of the nearest of the 16 values of the
type's table (ties to the lower table value: the midpoints are the decision bounds, as in
its CUDA decision tree and its torch kernel); two indices a byte, the first in the high
nibble, an odd count padded with the index of 0. With double quantisation ("compress
statistics"), the absmax are stored as 8-bit codes too: their mean (``nested_offset``) is
taken off, and the rest quantized in blocks of 256 with bitsandbytes' signed "dynamic" map
(``create_dynamic_map``: 256 sorted values), each nested block's largest magnitude kept in
float32 (``nested_absmax``). There bitsandbytes' native CPU kernel (a binary search over a
precomputed grid) sometimes picks the map value next to the nearest one (5 of 768 absmax
in a test); ckptkit takes the nearest, as its CUDA kernel (which made the files in use)
and its portable torch kernel do. Reading reverses it: absmax = nested_map[code] x
nested_absmax + offset, value = table[index] x absmax, in float32.

Everything here is whole-tensor torch operations over blocks (no loop over blocks): the
callers hand in slices of whole blocks.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 64  # values per absmax (bitsandbytes' default, Forge's and diffusers' files)
NESTED_BLOCK = 256  # absmax per nested absmax (quantize_4bit's compress_statistics)

# The 16 values of each type, index order (bitsandbytes' get_4bit_type). NF4: the quantiles
# of a normal distribution, normalised to [-1, 1] (QLoRA, Dettmers et al. 2023); FP4: a sign
# bit, 2 exponent bits and 1 mantissa bit, divided by its largest value (12).
_TABLES = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "fp4": tuple(v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                  -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)),
}


def table(kind: str) -> torch.Tensor:
    """The 16 values (float32) that the 4-bit indices of ``kind`` stand for."""
    return torch.tensor(_TABLES[kind], dtype=torch.float32)


@functools.cache
def _bounds(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision bounds between the sorted table values, and each sorted value's index."""
    values = table(kind)
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map()``, 7 exponent bits):
    for each decade 10^-6 .. 10^0, 2^i + 1 evenly spaced bounds from 0.1 to 1 of which the
    midpoints, times the decade, are values, with both signs; then 0 and 1; sorted."""
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (i - 6)  # times float32 values: float32 products, as bitsandbytes
        values += (decade * means).tolist() + (-decade * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def block_absmax(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The largest magnitude of each block of ``block`` values of flat float32 ``x`` (a last
    short block padded with zeros, which change no maximum)."""
    pad = -x.numel() % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block).abs().amax(dim=1)


def _scaled(x: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """Each value of ``x`` (whole blocks of ``block``) times its block's 1/absmax (0/0 taken
    as 0), clamped to [-1, 1]."""
    scale = absmax.clamp(min=1e-38).reciprocal().unsqueeze(1)
    return (x.view(-1, block) * scale).clamp_(-1, 1).view(-1)


def encode(x: torch.Tensor, kind: str, out: torch.Tensor) -> None:
    """Packs flat float32 ``x`` as 4-bit indices of ``kind`` into uint8 ``out``
    (``(x.numel() + 1) // 2`` bytes), blocks of ``BLOCK`` from its first value. The index
    of the nearest value is the count of decision bounds below the scaled value: 15
    comparisons, 3x faster than ``torch.bucketize``'s search here."""
    count = x.numel()
    pad = -count % BLOCK
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
    scaled = _scaled(padded, block_absmax(padded), BLOCK)
    bounds, order = _bounds(kind)
    index = torch.zeros(scaled.numel(), dtype=torch.uint8)
    above = torch.empty(scaled.numel(), dtype=torch.bool)
    for bound in bounds.tolist():
        index.add_(torch.gt(scaled, bound, out=above))
    if kind != "nf4":  # NF4's table is sorted: its indices are the sorted ones
        index = order[index.long()]
    index = index[:count + count % 2]  # a zero's index pads an odd count, as bitsandbytes
    torch.bitwise_or(index[0::2] << 4, index[1::2], out=out)


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantisation of a tensor's float32 ``absmax``: (uint8 codes, float32 absmax of
    each block of ``NESTED_BLOCK``, the offset). The offset is torch's float32 mean of all
    of them, as bitsandbytes takes it; each centred value times its block's 1/absmax gets
    the nearest map value, as bitsandbytes' CUDA kernel (and its portable torch kernel)
    chooses it."""
    offset = absmax.mean()
    centred = absmax - offset
    nested = block_absmax(centred, NESTED_BLOCK)
    pad = -centred.numel() % NESTED_BLOCK
    padded = torch.nn.functional.pad(centred, (0, pad)) if pad else centred
    codes = dynamic_map()
    bounds = (codes[:-1] + codes[1:]) / 2
    index = torch.bucketize(_scaled(padded, nested, NESTED_BLOCK), bounds, out_int32=True)
    index = index[:centred.numel()]
    return index.to(torch.uint8), nested, float(offset)


def expand_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: float,
                  nested_map: torch.Tensor, nested_block: int) -> torch.Tensor:
    """The float32 absmax that double-quantised ``codes`` stand for (bitsandbytes'
    ``dequantize_blockwise`` then ``+= offset``)."""
    index = torch.arange(codes.numel()) // nested_block
    return nested_map[codes.long()] * nested[index] + offset


def decode(packed: torch.Tensor, quant_map: torch.Tensor, absmax: torch.Tensor,
           block: int, count: int) -> torch.Tensor:
    """``count`` float32 values from uint8 ``packed`` indices into the 16-value ``quant_map``,
    times float32 ``absmax`` (one a block of ``block``, from the first value)."""
    index = torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1)[:count].long()
    index = torch.nn.functional.pad(index, (0, max(0, absmax.numel() * block - count)))
    values = quant_map[index].view(absmax.numel(), block) * absmax.unsqueeze(1)
    return values.view(-1)[:count]
