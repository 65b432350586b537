"""The streaming GGUF writer: header from the plan, then each tensor's blocks into the file.

A GGUF file (version 3, little-endian, as ggml's ``gguf.c`` and the ``gguf`` package write
it) is a header (magic, version, tensor and key counts), the key-value metadata, one info
per tensor (name, dimensions innermost first, GGML type, offset from the data start), padding
to ``general.alignment`` (32 unless the metadata says otherwise), then each tensor's bytes,
each padded to the alignment. Every offset follows from the plan, so the file is written in
one pass, in order: each tensor is produced straight into a reused write buffer
(``produce_into`` gets a flat uint8 view of exactly its bytes), which a thread writes out
while the next one is produced (``_Appender``): peak memory is what one tensor's producer
needs plus two buffers of the largest tensor, whatever the file's size.
The file is written through ``AtomicOutput``: it takes the target's name only once complete,
synced and its header read back; on any failure nothing is left.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import OutputError
from ..quant.ggml_types import BY_NAME
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
        _reserve(out.fd, size, target)
        with _Appender(out.fd, out.tmp_path, size, target) as data:
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


def _reserve(fd: int, size: int, target: str) -> None:
    """The file's blocks taken before any work, so that a full disk is said at once."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise _no_room(size, exc, target) from None
        os.ftruncate(fd, size)


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room(size: int, exc: OSError, target: str) -> OutputError:
    return OutputError(f"no room for {size:,} bytes ({exc.strerror})", target)


# Direct writes (O_DIRECT) need offsets, lengths and buffer addresses aligned to the device's
# logical block: 4 KiB covers every common one (and a mapped buffer starts on a page).
BLOCK = 4096
# Bytes gathered before they are written: fewer, larger writes.
BATCH = 8 << 20


class _Appender:
    """The file's bytes appended in order from two reused buffers, written in whole blocks
    by a thread while the next tensor is produced into the other buffer.

    Why not produce into a map of the output: each new page of the file's cache costs a
    fault and, where the blocks were reserved, zeroing it first (ext4 reads reserved blocks
    as zeros): about a quarter of quantize's CPU time. Here the buffers' pages stay resident
    from tensor to tensor, and writes bypass the page cache (``O_DIRECT``: no copy, no pages
    to write back), so peak memory is two buffers of the largest tensor. Where the file
    system refuses direct writes (or a write's alignment), the same writes go through the
    page cache."""

    def __init__(self, fd: int, path: str, size: int, target: str):
        self.fd, self.size, self.target = fd, size, target
        self.direct = _open_direct(path)
        self.buffers = [mmap.mmap(-1, BATCH + BLOCK) for _ in range(2)]
        self.pending: list[Future | None] = [None, None]
        self.current = 0
        self.fill = 0  # bytes in the current buffer
        self.offset = 0  # where the current buffer's first byte goes in the file
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-gguf-write")

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
        if self.direct >= 0:
            os.close(self.direct)
        for buffer in self.buffers:
            buffer.close()

    def append(self, data: bytes) -> None:
        self._room(len(data))
        self.buffers[self.current][self.fill:self.fill + len(data)] = data
        self._advance(len(data))

    def zeros(self, count: int) -> None:
        self.append(bytes(count))

    def produce(self, nbytes: int, produce_into: Callable[[Any], None]) -> None:
        """``produce_into`` fills a flat uint8 tensor of the next ``nbytes`` bytes (every one
        of them: the buffer holds earlier tensors' bytes)."""
        import torch

        if not nbytes:
            return
        self._room(nbytes)
        view = torch.frombuffer(self.buffers[self.current], dtype=torch.uint8, count=nbytes,
                                offset=self.fill)
        produce_into(view)
        del view
        self._advance(nbytes)

    def finish(self) -> None:
        """Writes what is left (the last block padded with zeros, then cut off) and waits
        for every write."""
        tail = -self.fill % BLOCK
        self.zeros(tail)
        self._flush(self.fill)
        for future in self.pending:
            if future is not None:
                future.result()
        if self.offset - tail != self.size:
            raise OutputError(f"wrote {self.offset - tail:,} bytes where {self.size:,} were "
                              "planned", self.target)
        os.ftruncate(self.fd, self.size)

    def _room(self, count: int) -> None:
        """The current buffer grown to hold ``count`` more bytes (never while it is being
        written: only the other one is)."""
        self._grow(self.current, self.fill + count, keep=self.fill)

    def _advance(self, count: int) -> None:
        self.fill += count
        if self.fill >= BATCH:
            self._flush(self.fill // BLOCK * BLOCK)

    def _flush(self, whole: int) -> None:
        """Writes the current buffer's first ``whole`` bytes (whole blocks) in the thread;
        the rest moves to the other buffer, once that one's write is done."""
        done, other = self.current, 1 - self.current
        if self.pending[other] is not None:
            self.pending[other].result()
            self.pending[other] = None
        rest = self.fill - whole
        self._grow(other, rest)
        self.buffers[other][:rest] = self.buffers[done][whole:self.fill]
        self.pending[done] = self.writer.submit(self._write, self.buffers[done], whole,
                                                self.offset)
        self.current, self.fill, self.offset = other, rest, self.offset + whole

    def _grow(self, index: int, count: int, keep: int = 0) -> None:
        """Buffer ``index`` made at least ``count`` bytes (whole blocks), its first ``keep``
        bytes kept."""
        buffer = self.buffers[index]
        if count > len(buffer):
            bigger = mmap.mmap(-1, -(-count // BLOCK) * BLOCK)
            bigger[:keep] = buffer[:keep]
            buffer.close()
            self.buffers[index] = bigger

    def _write(self, buffer: mmap.mmap, count: int, offset: int) -> None:
        view = memoryview(buffer)[:count]
        try:
            while view:
                try:
                    written = os.pwrite(self.direct if self.direct >= 0 else self.fd, view,
                                        offset)
                except OSError as exc:
                    if exc.errno in _NO_ROOM:
                        raise _no_room(self.size, exc, self.target) from None
                    if exc.errno != errno.EINVAL or self.direct < 0:
                        raise
                    self._buffered()  # a block size beyond ours: through the page cache
                    continue
                if written <= 0:
                    raise OutputError(f"the file system took no bytes at {offset:,}",
                                      self.target)
                if written % BLOCK:
                    self._buffered()  # a short write: the rest is not aligned any more
                view, offset = view[written:], offset + written
        finally:
            view.release()

    def _buffered(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1


def _open_direct(path: str) -> int:
    """The file opened again for writes that bypass the page cache, or -1 where the file
    system (or the platform) has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return -1
