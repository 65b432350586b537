"""Turns layout moves (``arch.layouts.Move``) into planned output tensors for the writer.

A plain copy of a contiguous tensor stays a file-to-file copy (bit-identical, no process
memory); splitting, stacking and transposing read just the tensors of that one output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from ..arch.layouts import Move
from ..formats import LazyTensor
from ..formats.dtypes import DType, torch_dtype
from .writer import CopyRange, Planned


def _shape(move: Move, sources: Sequence[LazyTensor]) -> tuple[int, ...]:
    first = sources[0].shape
    if move.op == "rows":
        return (first[0] // move.parts, *first[1:])
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
        size = tensor.shape[0] // move.parts
        return tensor[move.index * size:(move.index + 1) * size].contiguous()
    if move.op == "transpose":
        return tensor.t().contiguous()
    return tensor


def copy_range(tensor: LazyTensor) -> CopyRange:
    """A contiguous lazy tensor as a file-to-file copy of its bytes."""
    return CopyRange(tensor.source, tensor.byte_offset + tensor.dtype.nbytes(
        tensor.storage_offset), tensor.nbytes)


def plan_moves(moves: Sequence[Move], tensors: Mapping[str, LazyTensor],
               scalar_dtypes: Mapping[str, DType] | None = None) -> list[Planned]:
    """Planned outputs for ``moves`` whose sources are in ``tensors``."""
    planned = []
    for move in moves:
        if move.op == "scalar":
            dtype = (scalar_dtypes or {}).get(move.target)
            if dtype is None:
                raise KeyError(f"no dtype recorded for {move.target}")
            planned.append(Planned(move.target, dtype, (), partial(_produce, move, (), dtype)))
            continue
        sources = [tensors[k] for k in move.sources]
        dtype = sources[0].dtype
        if move.op == "copy" and sources[0].is_contiguous:
            produce = partial(copy_range, sources[0])
        else:
            produce = partial(_produce, move, sources, dtype)
        planned.append(Planned(move.target, dtype, _shape(move, sources), produce))
    return planned
