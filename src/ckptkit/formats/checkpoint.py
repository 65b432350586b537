"""An open checkpoint: a read-only mapping from key to lazy tensor, whatever the file format.

Opening a file reads its header (or pickle) only. A ``LazyTensor`` knows where its bytes are
(file, byte offset, element type, shape, strides) and reads them when asked: ``load`` gives a
zero-copy torch view of the memory-mapped file, ``read`` a private copy of just its bytes
(what streaming operations use, so that memory is returned as soon as the tensor is written).
"""

from __future__ import annotations

import gc
import math
import struct
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import CkptError, FormatError
from .dtypes import STRUCT_CODES, DType, torch_dtype
from .source import Source


@dataclass(eq=False, slots=True)
class LazyTensor:
    """A tensor not yet read: ``shape`` elements of ``dtype`` at ``byte_offset`` in ``source``.

    Slotted: a header may describe millions of tensors, and a per-instance ``__dict__`` would
    triple the memory each one takes.

    ``strides`` are in elements; ``None`` means contiguous. ``storage_offset`` (elements) and
    ``storage_nbytes`` describe the storage the strides index into, which starts at
    ``byte_offset``; tensors that share a storage share ``storage_id``.
    """

    source: Source
    dtype: DType
    shape: tuple[int, ...]
    byte_offset: int
    storage_nbytes: int
    storage_offset: int = 0
    strides: tuple[int, ...] | None = None
    storage_id: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's own data once contiguous (what a safetensors file stores)."""
        return self.dtype.nbytes(self.numel)

    @property
    def is_contiguous(self) -> bool:
        if self.strides is None:
            return True
        expected = 1
        for dim, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if dim != 1 and stride != expected:
                return False
            expected *= dim
        return True

    @property
    def data_offset(self) -> int:
        """Where the first element's bytes are in the file."""
        return self.byte_offset + self.dtype.nbytes(self.storage_offset)

    @property
    def byte_rows(self) -> bool:
        """Whether its rows are consecutive whole-byte ranges of the file (contiguous, no
        sub-byte elements): what can be read, or copied file to file, a row block at a time."""
        return self.is_contiguous and self.dtype.bits >= 8

    def raw(self) -> bytearray:
        """The tensor's bytes, contiguous, read from the file (no torch needed)."""
        with _about(self.source.path):
            return self._raw()

    def read(self):
        """A torch tensor holding a private copy of this tensor's bytes."""
        with _about(self.source.path):
            return self._read()

    def read_rows(self, start: int, stop: int):
        """Rows ``start:stop`` (along the first dimension) as a private torch tensor; only
        those bytes are read when the tensor is contiguous, so a big tensor can be worked
        on a slice at a time without all of it in memory."""
        if not self.shape:
            raise FormatError("a 0-d tensor has no rows", self.source.path)
        stop = min(stop, self.shape[0])
        if not self.byte_rows or self.numel == 0:
            return self.read()[start:stop]
        row = self.dtype.nbytes(self.numel // self.shape[0])
        offset = self.data_offset + start * row
        with _about(self.source.path):
            buf = self.source.read(offset, (stop - start) * row)
            return _frombuffer(buf, self.dtype).view(
                self.dtype.torch_shape((stop - start, *self.shape[1:])))

    def load(self):
        """A torch tensor viewing the memory-mapped file: no copy, pages read on first touch."""
        with _about(self.source.path):
            return self._load()

    def scalar(self) -> float:
        """The value of a one-element tensor (a LoRA alpha), decoded without torch."""
        if self.numel != 1:
            raise FormatError(f"a tensor of shape {list(self.shape)} is not a scalar",
                              self.source.path)
        raw = bytes(self.raw())
        if self.dtype.name == "BF16":
            return struct.unpack("<f", b"\x00\x00" + raw)[0]
        code = STRUCT_CODES.get(self.dtype.name)
        if code is None:
            raise FormatError(f"cannot decode a {self.dtype} scalar", self.source.path)
        return float(struct.unpack("<" + code, raw)[0])

    def _raw(self) -> bytearray:
        if not self.is_contiguous:
            return tensor_bytes(self._read())
        return self.source.read(self.data_offset, self.nbytes)

    def _read(self):
        torch = _torch()
        shape = self.dtype.torch_shape(self.shape)
        if self.numel == 0:
            return torch.empty(shape, dtype=torch_dtype(self.dtype))
        if self.is_contiguous:
            buf = self._raw()
            return _frombuffer(buf, self.dtype).view(shape)
        item = self.dtype.bits // 8
        last = self.storage_offset + sum(
            (d - 1) * s for d, s in zip(self.shape, self.strides or (), strict=True))
        first_byte = self.storage_offset * item
        buf = self.source.read(self.byte_offset + first_byte, (last + 1) * item - first_byte)
        flat = _frombuffer(buf, self.dtype)
        return flat.as_strided(self.shape, self.strides, 0).contiguous()

    def _load(self):
        torch = _torch()
        shape = self.dtype.torch_shape(self.shape)
        if self.numel == 0:
            return torch.empty(shape, dtype=torch_dtype(self.dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A storage shared by tensors of several dtypes may end in a partial element.
            whole = self.storage_nbytes - self.storage_nbytes % max(self.dtype.bits // 8, 1)
            flat = torch.frombuffer(self.source.mmap(), dtype=torch.uint8, count=whole,
                                    offset=self.byte_offset)
        typed = flat.view(torch_dtype(self.dtype))
        strides = self.strides if self.strides is not None else _contiguous_strides(shape)
        return typed.as_strided(shape, strides, self.storage_offset)


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while a reader builds millions of small objects
    that hold no cycles (a header's entries): it would walk everything built so far again
    and again, for nothing (decoding a 93 MB header of 1.6 million entries took 7.6 s with
    it running, 2.2 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _about(path: str) -> Iterator[None]:
    """Names the file in errors raised while reading one of its tensors."""
    try:
        yield
    except CkptError as exc:
        if exc.path is None:
            raise type(exc)(exc.reason, path) from None
        raise


def tensor_bytes(tensor) -> bytearray:
    """The bytes of a torch tensor in row-major order, copied into a new bytearray."""
    torch = _torch()
    out = bytearray(tensor.numel() * tensor.element_size())
    if out:
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        torch.frombuffer(out, dtype=torch.uint8).copy_(flat)
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, running = [], 1
    for dim in reversed(shape):
        strides.append(running)
        running *= dim
    return tuple(reversed(strides))


def _torch():
    import torch

    return torch


def _frombuffer(buf: bytearray, dtype: DType):
    torch = _torch()
    if not buf:
        return torch.empty(0, dtype=torch_dtype(dtype))
    return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype(dtype))


@dataclass
class Checkpoint(Mapping[str, LazyTensor]):
    """An open checkpoint file: its tensors by key plus what else the file says about itself.

    ``format`` is ``safetensors``, ``torch-zip`` or ``torch-legacy``. ``metadata`` is the
    safetensors ``__metadata__`` (string to string). ``extras`` describes entries that are
    not weights (a pickle's ``global_step``, optimizer states...), ``weights_at`` the path of
    the entry that held the weights (``state_dict``), and ``notes`` what the reader noticed
    that a user should know (a misleading extension, dropped entries).
    """

    path: str
    format: str
    tensors: dict[str, LazyTensor]
    source: Source
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    weights_at: str = ""
    notes: list[str] = field(default_factory=list)
    container: Any = None  # the torch ZIP directory (members, CRCs) for a zip checkpoint

    def __getitem__(self, key: str) -> LazyTensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    # The dict's own views: ``Mapping``'s would call ``__getitem__`` once per key, which is
    # most of the time of inspecting a header of a million tensors.
    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def values(self):
        return self.tensors.values()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checked_shape(value: Any, where: str, path: str) -> tuple[int, ...]:
    """A shape from a header: a list of non-negative integers, or a ``FormatError``."""
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise FormatError(f"{where}: shape {value!r} is not a list of non-negative integers",
                          path)
    return tuple(value)
