"""Quantizers of the 32-value block types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) and of BF16, in torch.

Each function takes float32 blocks, one per row (``(n, 32)``; any number of rows for BF16),
and gives their stored bytes, ``(n, type_size)`` uint8, written into ``out`` when given (the
blocks' place in the output file). They compute what ggml's reference
quantizers (``quantize_row_q*_ref`` in ``ggml-quants.c``) compute, in the same float32 steps
as the ``gguf`` package's numpy port, so that the bytes are the same as its bytes
(``gguf.quants.quantize``; the tests hold them to it, ties and extremes included):

- the scale is a float32 division, stored as fp16 rounded to nearest even (torch's cast and
  numpy's are both IEEE's);
- Q8_0 rounds half away from zero (C's ``roundf``), which torch does not offer: it adds the
  float32 just below 0.5 with the value's sign and truncates (``_BELOW_HALF``), which gives
  what the ``gguf`` package's floor and exact fraction give;
- the 4- and 5-bit types truncate ``x * (1/d) + 8.5`` (or ``+ 16.5``, ``+ 0.5``) toward zero
  and clip, as the C code's ``(int8_t)`` cast and ``MIN`` do;
- the value of largest magnitude is the first one (C's strict ``<``, numpy's ``argmax``,
  torch's ``argmax`` all keep the first of equals).
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int64)  # bit i of a byte has weight 2**i


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    """``(n,)`` or ``(n, 1)`` float32 as fp16, little-endian bytes: ``(n, 2)`` uint8."""
    return value.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _stored(blocks: torch.Tensor, type_size: int, out: torch.Tensor | None) -> torch.Tensor:
    """Where a kernel writes its blocks' bytes: ``out`` (``(n, type_size)`` uint8, the
    blocks' place in the output file: each field goes straight there, with no concatenated
    copy made first), or a new tensor."""
    if out is None:
        return torch.empty((blocks.shape[0], type_size), dtype=torch.uint8)
    return out


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1/d``, and 0 where ``d`` is 0 (an all-zero block): C's ``d ? 1.0f/d : 0.0f``."""
    return torch.where(d == 0, torch.zeros((), dtype=d.dtype), 1.0 / d)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 codes per row packed two to a byte: the first 16 in the low nibbles, the last 16
    in the high ones (ggml's ``qs[j] = q[j] | q[j + 16] << 4``)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 codes as a little-endian 32-bit mask (``qh``), as 4 bytes."""
    bits = (q >> 4).to(torch.int64).view(-1, 4, 8)
    return (bits * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of each row, sign kept (the first of equals)."""
    return blocks.gather(1, blocks.abs().argmax(1, keepdim=True))


def _truncated_codes(scaled: torch.Tensor, top: int) -> torch.Tensor:
    """``scaled`` (already offset by +0.5 or more) truncated toward zero and clipped to
    ``0..top``, as uint8 (the float-to-integer cast truncates)."""
    return scaled.clamp_(0, top).to(torch.uint8)


# The float32 just below 0.5. Adding it (with the value's sign) and truncating toward zero is
# C's roundf (half away from zero) for every float32: at a tie v = k + 0.5 the sum rounds up
# to k + 1, and nowhere else does it reach the next integer (checked over every float32 of
# magnitude up to 128 against the gguf package's floor-and-fraction steps). Three passes over
# the values (sign, add, the cast) where those steps take eight.
_BELOW_HALF = 0.5 - 2 ** -25


def q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _stored(blocks, 34, out)
    d = blocks.abs().amax(1, keepdim=True).div_(127)
    scaled = blocks * _inverse(d)
    scaled.add_(scaled.sign().mul_(_BELOW_HALF))
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:].view(torch.int8).copy_(scaled)  # the cast truncates toward zero
    return out


def q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _stored(blocks, 18, out)
    d = _signed_max(blocks) / -8
    q = _truncated_codes((blocks * _inverse(d)).add_(8.5), 15)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = _nibbles(q)
    return out


def q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _stored(blocks, 22, out)
    d = _signed_max(blocks) / -16
    q = _truncated_codes((blocks * _inverse(d)).add_(16.5), 31)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:6] = _high_bits(q)
    out[:, 6:] = _nibbles(q)
    return out


def _min_and_step(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    low = blocks.amin(1, keepdim=True)
    return low, (blocks.amax(1, keepdim=True) - low) / levels


def q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _stored(blocks, 20, out)
    low, d = _min_and_step(blocks, 15)
    q = _truncated_codes((blocks - low).mul_(_inverse(d)).add_(0.5), 15)
    out[:, :2], out[:, 2:4] = _fp16_bytes(d), _fp16_bytes(low)
    out[:, 4:] = _nibbles(q)
    return out


def q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _stored(blocks, 24, out)
    low, d = _min_and_step(blocks, 31)
    q = _truncated_codes((blocks - low).mul_(_inverse(d)).add_(0.5), 31)
    out[:, :2], out[:, 2:4] = _fp16_bytes(d), _fp16_bytes(low)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _nibbles(q)
    return out


def bf16(values: torch.Tensor) -> torch.Tensor:
    """float32 to bfloat16 bytes, rounded to nearest even, NaN kept quiet: ggml's
    ``ggml_compute_fp32_to_bf16`` (torch's own cast rounds the same way for finite values;
    this spells it out so that NaN payloads match too)."""
    n = values.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF
    return n.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(*values.shape[:-1], -1)


BLOCK_QUANTIZERS = {"Q8_0": q8_0, "Q5_1": q5_1, "Q5_0": q5_0, "Q4_1": q4_1, "Q4_0": q4_0}
