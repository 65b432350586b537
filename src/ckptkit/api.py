"""The public Python surface: open any checkpoint lazily, write safetensors streaming, load
a checkpoint (or a mix of parts) as a diffusers pipeline (``ops.load``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial

from .engine.moves import copy_range
from .engine.writer import Planned, write_safetensors
from .formats import Checkpoint, LazyTensor, open_checkpoint
from .formats.dtypes import from_torch_tensor
from .ops.load import load_pipeline

__all__ = ["load_pipeline", "open", "save_safetensors"]


def open(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a checkpoint of any supported format as a lazy, read-only mapping."""
    return open_checkpoint(path)


def save_safetensors(tensors: Mapping[str, object], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Writes torch tensors (or lazy tensors, read one at a time) to ``path`` atomically."""
    planned, inputs = [], set()
    for key, value in tensors.items():
        if isinstance(value, LazyTensor):
            inputs.add(value.source.path)
            produce = partial(copy_range, value) if value.is_contiguous else value.read
            planned.append(Planned(key, value.dtype, value.shape, produce))
        else:
            dtype, shape = from_torch_tensor(value)
            planned.append(Planned(key, dtype, shape, lambda v=value: v))
    write_safetensors(os.fspath(path), planned, metadata, inputs=tuple(sorted(inputs)))
