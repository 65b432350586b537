"""Values to GGML bytes: ``quantize(values, qtype)`` and ``quantize_into(values, qtype, out)``.

The one entry point the GGUF writer needs, whatever the type: block types go through their
kernel (``legacy``, ``kquants``) a slice of blocks at a time, converted to float32 one slice
at a time, so that a 3 GB tensor costs a few MB of intermediates rather than 12 GB of float32;
the plain types (F32, F16, BF16) are a cast, or a copy where the source already has the type.
A row's length must be a multiple of the type's block size (``can_quantize`` says), so that
no block straddles two rows and a tensor is simply its blocks in order.
"""

from __future__ import annotations

import torch

from .ggml_types import BY_NAME
from .kquants import K_QUANTIZERS
from .legacy import BLOCK_QUANTIZERS, bf16

# Values per slice: 256 K (1 MB of float32 a temporary) keep a slice's passes in a core's L2
# cache while making Python's per-call cost small (Q4_K, one thread: 560 ns a value in slices
# of 16 K, 268 in 64 K, 163 in 256 K, on a busy machine).
K_SLICE = 1 << 18
BLOCK_SLICE = 1 << 18

QUANTIZERS = {**BLOCK_QUANTIZERS, **K_QUANTIZERS}
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
WRITABLE = (*PLAIN, *QUANTIZERS)


def can_quantize(shape: tuple[int, ...], qtype: str) -> bool:
    """Whether a tensor of ``shape`` can be stored as ``qtype``: rows of whole blocks."""
    return bool(shape) and shape[-1] % BY_NAME[qtype].block_size == 0


def _require_blocks(values: torch.Tensor, qtype: str) -> None:
    if not can_quantize(tuple(values.shape), qtype):
        raise ValueError(f"rows of {values.shape[-1]} values are not whole {qtype} blocks")


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return BY_NAME[qtype].nbytes(count)


def quantize(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """``values`` (any float dtype) stored as ``qtype``: a flat uint8 tensor of its bytes."""
    _require_blocks(values, qtype)
    out = torch.empty(nbytes(tuple(values.shape), qtype), dtype=torch.uint8)
    quantize_into(values, qtype, out)
    return out


def quantize_into(values: torch.Tensor, qtype: str, out: torch.Tensor) -> None:
    """Writes the bytes of ``values`` stored as ``qtype`` into ``out`` (flat uint8 of
    ``nbytes(values.shape, qtype)``: the tensor's place in a memory-mapped output file)."""
    _require_blocks(values, qtype)
    kind = BY_NAME[qtype]
    flat = values.reshape(-1)
    if qtype in PLAIN:
        _plain_into(flat, qtype, out)
        return
    kernel = QUANTIZERS[qtype]
    blocks = flat.view(-1, kind.block_size)
    step = max(1, (K_SLICE if qtype in K_QUANTIZERS else BLOCK_SLICE) // kind.block_size)
    stored = out.view(-1, kind.type_size)
    for first in range(0, blocks.shape[0], step):
        part = blocks[first:first + step].to(torch.float32)
        if qtype in BLOCK_QUANTIZERS:  # writes each field into its place
            kernel(part, stored[first:first + step])
        else:
            stored[first:first + step] = kernel(part)


def _plain_into(flat: torch.Tensor, qtype: str, out: torch.Tensor) -> None:
    target = PLAIN[qtype]
    stored = out.view(target)
    step = BLOCK_SLICE
    for first in range(0, flat.shape[0], step):
        part = flat[first:first + step]
        if qtype == "BF16" and part.dtype != torch.bfloat16:
            # ggml's own rounding (NaN kept quiet), as the gguf package writes BF16
            stored[first:first + step] = bf16(part.to(torch.float32)).view(torch.bfloat16)
        else:
            stored[first:first + step] = part.to(target)
