"""Turns layout moves (``arch.layouts.Move``) into planned output tensors for the writer.

A plain copy of a contiguous tensor stays a file-to-file copy (bit-identical, no process
memory), and so do row blocks of one (open_clip's stacked q/k/v split for transformers),
stacks of several (the other way) and swapped row halves (FLUX's adaLN); a 2-D transpose
(CLIP-G's projection) reorders the bytes of that one tensor. None of these needs torch, whose
import alone takes a second: a split or assemble of byte-identical tensors never loads it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from functools import partial

from ..arch.layouts import Move
from ..formats import LazyTensor
from ..formats.dtypes import STRUCT_CODES, DType, torch_dtype
from .writer import CopyRange, Planned


def _shape(move: Move, sources: Sequence[LazyTensor]) -> tuple[int, ...]:
    first = sources[0].shape
    if move.op == "rows":
        start, stop = move.row_range(first[0])
        return (stop - start, *first[1:])
    if move.op == "reshape":
        return move.shape
    if move.op == "concat":
        return (sum(s.shape[0] for s in sources), *first[1:])
    if move.op == "transpose":
        return tuple(reversed(first))
    return first


def _produce(move: Move, sources: Sequence[LazyTensor], dtype: DType):
    import torch

    if move.op == "scalar":
        return torch.tensor(move.value, dtype=torch_dtype(dtype))
    if move.op == "concat":
        return torch.cat([s.read() for s in sources])
    tensor = sources[0].read()
    if move.op == "rows":
        start, stop = move.row_range(tensor.shape[0])
        return tensor[start:stop].contiguous()
    if move.op == "transpose":
        return tensor.t().contiguous()
    if move.op == "reshape":
        return tensor.reshape(move.shape)
    if move.op == "swap_halves":
        half = tensor.shape[0] // 2
        return torch.cat([tensor[half:], tensor[:half]])
    return tensor


def _scalar(move: Move, dtype: DType):
    """A float scalar (CLIP's logit_scale) encoded as ``dtype`` the way torch rounds it
    (to float32 first; for bfloat16, then to the nearest even 16 high bits), without torch
    where ``struct`` can: NaN, out-of-range values and other dtypes go through torch."""
    try:
        if dtype.name == "BF16" and not math.isnan(move.value):
            bits = int.from_bytes(struct.pack("<f", move.value), "little")
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to_bytes(2, "little")
        if dtype.is_float and dtype.name in STRUCT_CODES:
            return struct.pack("<" + STRUCT_CODES[dtype.name], move.value)
    except OverflowError:
        pass
    return _produce(move, (), dtype)


def _transposed(tensor: LazyTensor) -> bytes:
    """The bytes of a contiguous 2-D tensor, transposed: column ``j`` of the stored matrix
    is every ``cols``-th element from ``j``, which a strided memoryview gathers in C."""
    cols = tensor.shape[1]
    flat = memoryview(tensor.raw()).cast(_ITEM_FORMATS[tensor.dtype.bits])
    return b"".join(flat[j::cols].tobytes() for j in range(cols))


_ITEM_FORMATS = {8: "B", 16: "H", 32: "I", 64: "Q"}  # an unsigned int of each element size


def copy_range(tensor: LazyTensor, rows: tuple[int, int] | None = None) -> CopyRange:
    """A contiguous lazy tensor (or its rows ``start, stop``) as a file-to-file copy of its
    bytes."""
    if rows is None:
        return CopyRange(tensor.source, tensor.data_offset, tensor.nbytes)
    row = tensor.nbytes // tensor.shape[0]
    return CopyRange(tensor.source, tensor.data_offset + rows[0] * row,
                     (rows[1] - rows[0]) * row)


def _copyable(tensor: LazyTensor) -> bool:
    """Whether the tensor has rows, each a whole byte range of its file."""
    return tensor.byte_rows and bool(tensor.shape)


def _swapped(tensor: LazyTensor) -> tuple[CopyRange, CopyRange]:
    half = tensor.shape[0] // 2
    return (copy_range(tensor, (half, tensor.shape[0])), copy_range(tensor, (0, half)))


def plan_moves(moves: Sequence[Move], tensors: Mapping[str, LazyTensor],
               scalar_dtypes: Mapping[str, DType] | None = None) -> list[Planned]:
    """Planned outputs for ``moves`` whose sources are in ``tensors``."""
    planned = []
    for move in moves:
        if move.op == "scalar":
            dtype = (scalar_dtypes or {}).get(move.target)
            if dtype is None:
                raise KeyError(f"no dtype recorded for {move.target}")
            planned.append(Planned(move.target, dtype, (), partial(_scalar, move, dtype)))
            continue
        sources = [tensors[k] for k in move.sources]
        dtype = sources[0].dtype
        if move.op in ("copy", "reshape") and sources[0].is_contiguous:  # same bytes
            produce = partial(copy_range, sources[0])
        elif move.op == "rows" and _copyable(sources[0]):  # a slice of the same bytes
            produce = partial(copy_range, sources[0], move.row_range(sources[0].shape[0]))
        elif move.op == "concat" and all(_copyable(t) for t in sources):  # the same, in turn
            produce = partial(tuple, (copy_range(t) for t in sources))
        elif move.op == "swap_halves" and _copyable(sources[0]):
            produce = partial(_swapped, sources[0])
        elif (move.op == "transpose" and len(sources[0].shape) == 2 and sources[0].byte_rows
              and sources[0].dtype.bits in _ITEM_FORMATS):
            produce = partial(_transposed, sources[0])
        else:
            produce = partial(_produce, move, sources, dtype)
        planned.append(Planned(move.target, dtype, _shape(move, sources), produce))
    return planned


def read_moved(move: Move, tensors: Mapping[str, LazyTensor]):
    """The torch tensor a (non-scalar) move makes from ``tensors``: what a computation over
    files of different layouts reads, where a plain rewrite would copy bytes."""
    sources = [tensors[k] for k in move.sources]
    return _produce(move, sources, sources[0].dtype)
