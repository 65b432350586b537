"""The streaming GGUF writer: header from the plan, then each tensor's blocks into the file.

A GGUF file (version 3, little-endian, as ggml's ``gguf.c`` and the ``gguf`` package write
it) is a header (magic, version, tensor and key counts), the key-value metadata, one info
per tensor (name, dimensions innermost first, GGML type, offset from the data start), padding
to ``general.alignment`` (32 unless the metadata says otherwise), then each tensor's bytes,
each padded to the alignment. Every offset follows from the plan, so the file is written in
one pass, in order: each tensor is produced straight into a reused write buffer
(``produce_into`` gets a flat uint8 view of exactly its bytes), which a thread writes out
while the next one is produced (``appender``): peak memory is what one tensor's producer
needs plus two buffers of the largest tensor, whatever the file's size.
The file is written through ``AtomicOutput``: it takes the target's name only once complete,
synced and its header read back; on any failure nothing is left.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OutputError
from ..quant.ggml_types import BY_NAME
from .appender import Appender, reserve
from .atomic import AtomicOutput
from .writer import Deferred, Progress

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; general.alignment overrides it
ALIGNMENT_KEY = "general.alignment"

# GGUF value types (gguf.h's gguf_type)
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9


@dataclass
class GGUFTensor:
    """One tensor to write: its name, GGML type, shape (torch order, outermost first) and the
    function that fills its bytes (a flat uint8 tensor of ``nbytes``)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    produce_into: Callable[[Any], None]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        size = BY_NAME[self.qtype].nbytes(count)
        if size < 0:
            raise OutputError(f"{self.name}: {count} values are not whole {self.qtype} blocks")
        return size


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(key: str, value: Any) -> bytes:
    """A metadata value with its type: str (string), bool, int (uint32, as the converters
    write file type and quantization version), float (float32), or a list of ints (array of
    int32, as ComfyUI-GGUF reads ``comfy.gguf.orig_shape.*``)."""
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, bool):
        return struct.pack("<IB", _BOOL, value)
    if isinstance(value, int):
        return struct.pack("<II", _UINT32, value)
    if isinstance(value, float):
        return struct.pack("<If", _FLOAT32, value)
    if isinstance(value, list | tuple) and all(type(v) is int for v in value):
        return struct.pack(f"<IIQ{len(value)}i", _ARRAY, _INT32, len(value), *value)
    raise OutputError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _padding(offset: int, alignment: int) -> int:
    return -offset % alignment


def build_header(metadata: Mapping[str, Any], tensors: Sequence[GGUFTensor],
                 alignment: int) -> tuple[bytes, list[int]]:
    """The header bytes, padded to the alignment, and each tensor's offset in the data."""
    parts = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        parts += [_string(key), _value(key, value)]
    offsets, offset = [], 0
    seen = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise OutputError(f"the plan writes tensor {tensor.name!r} twice")
        seen.add(tensor.name)
        dims = tuple(reversed(tensor.shape)) or (1,)
        parts += [_string(tensor.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                  struct.pack("<IQ", BY_NAME[tensor.qtype].id, offset)]
        offsets.append(offset)
        offset += tensor.nbytes + _padding(tensor.nbytes, alignment)
    header = b"".join(parts)
    return header + b"\0" * _padding(len(header), alignment), offsets


def write_gguf(target: str, metadata: Mapping[str, Any], tensors: Sequence[GGUFTensor], *,
               inputs: tuple[str, ...] = (), progress: Progress | None = None,
               fsync: bool = True, check: Callable[[str], None] | None = None) -> None:
    """Writes ``tensors`` with ``metadata`` to ``target`` atomically, one tensor at a time.

    ``check(path)`` runs on the complete temporary file before it takes the target's name
    (the caller's read-back); an exception from it leaves nothing behind. A ``Deferred``
    string value (the inputs' SHA-256, hashed while the data is written) is written as its
    placeholder and patched in once the data is done, padded with spaces to the same length
    (its text is JSON, which allows them)."""
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 8 or alignment & (alignment - 1):
        raise OutputError(f"{ALIGNMENT_KEY} must be a power of two of at least 8, "
                          f"not {alignment!r}", target)
    deferred = {k: v for k, v in metadata.items() if isinstance(v, Deferred)}
    try:
        _write(target, metadata, tensors, alignment, deferred, inputs, progress, fsync, check)
    except BaseException:
        for value in deferred.values():
            value.cancel()
        raise


def _write(target, metadata, tensors, alignment, deferred, inputs, progress, fsync,
           check) -> None:
    placeholders = {k: v.placeholder if k in deferred else v for k, v in metadata.items()}
    header, offsets = build_header(placeholders, tensors, alignment)
    size = len(header) + (offsets[-1] + tensors[-1].nbytes if tensors else 0)
    size += _padding(size, alignment)
    if progress:
        progress.start(sum(t.nbytes for t in tensors), len(tensors))
    with AtomicOutput(target, inputs, fsync=fsync) as out:
        reserve(out.fd, size, target)
        with Appender(out.fd, out.tmp_path, size, target) as data:
            data.append(header)
            for tensor in tensors:
                data.produce(tensor.nbytes, tensor.produce_into)
                data.zeros(_padding(tensor.nbytes, alignment))
                if progress:
                    progress.update(tensor.nbytes, 1)
            data.finish()
        if deferred:
            os.pwrite(out.fd, _resolved(metadata, deferred, tensors, alignment, header,
                                        target), 0)
        if check is not None:
            check(out.tmp_path)
        out.commit()


def _resolved(metadata, deferred, tensors, alignment, header: bytes, target: str) -> bytes:
    """The header again with each deferred value resolved and padded to its placeholder's
    length, so that no offset moves."""
    final = dict(metadata)
    for key, value in deferred.items():
        text = value.resolve()
        room = len(value.placeholder.encode("utf-8"))
        if len(text.encode("utf-8")) > room:
            raise OutputError(f"metadata {key!r} came out longer than the room kept for it",
                              target)
        final[key] = text + " " * (room - len(text.encode("utf-8")))
    patched, _ = build_header(final, tensors, alignment)
    if len(patched) != len(header):
        raise OutputError("the header changed size when its deferred values were filled in",
                          target)
    return patched
