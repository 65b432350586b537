"""A file's bytes appended in order through two reused buffers that a thread writes out.

Both writers (safetensors and GGUF) write their output once, in order, and produce most of
its bytes by computing them. Computing into a shared map of the output file, as they first
did, costs a page fault per 4 KiB and the kernel zeroing each new page-cache page before it
is written (where the blocks were reserved, ext4 reads them as zeros): a quarter of
``quantize``'s CPU and up to a third of ``merge``'s in ``perf``. Here the bytes go into two
anonymous buffers whose pages stay resident from tensor to tensor, and a thread writes each
full one out while the next fills, bypassing the page cache (``O_DIRECT``: no copy, no dirty
pages to write back, no zeroing). Where the file system refuses direct writes (tmpfs, FUSE)
or a write's alignment, the same writes go through the page cache.

Memory: two buffers of ``BATCH`` bytes, grown only to hold the largest tensor computed in
place (``produce``); bytes given whole (``append``, ``copy``) pass through in pieces.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import OutputError
from ..formats.source import Source

# Direct writes (O_DIRECT) need offsets, lengths and buffer addresses aligned to the device's
# logical block: 4 KiB covers every common one (and a mapped buffer starts on a page).
BLOCK = 4096
# Bytes gathered before they are written: fewer, larger writes.
BATCH = 8 << 20

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_room(size: int, exc: OSError, target: str) -> OutputError:
    return OutputError(f"no room for {size:,} bytes ({exc.strerror})", target)


def reserve(fd: int, size: int, target: str) -> None:
    """The file's blocks taken before any work, so that a full disk is said at once; where
    the file system cannot reserve them, the file is only sized."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise no_room(size, exc, target) from None
        os.ftruncate(fd, size)


class Appender:
    """Appends to the file open as ``fd`` (written at ``path``) from its start, ``size``
    bytes in all; ``finish`` checks that count and waits for the last write. Leaving on an
    error keeps the buffers mapped: a failed producer's traceback, or its caller, may still
    hold tensors viewing them, and unmapping under those crashed the process at their next
    use."""

    def __init__(self, fd: int, path: str, size: int, target: str):
        self.fd, self.size, self.target = fd, size, target
        self.direct = _open_direct(path)
        self.buffers = [mmap.mmap(-1, BATCH + BLOCK) for _ in range(2)]
        self.pending: list[Future | None] = [None, None]
        self.current = 0
        self.fill = 0  # bytes in the current buffer
        self.offset = 0  # where the current buffer's first byte goes in the file
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-write")

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, kind, *exc: object) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
        if self.direct >= 0:
            os.close(self.direct)
        if kind is None:
            for buffer in self.buffers:
                buffer.close()

    @property
    def position(self) -> int:
        """Bytes appended so far."""
        return self.offset + self.fill

    def append(self, data: Any) -> None:
        """Appends a bytes-like object, in pieces that fit the buffer as it is."""
        view = memoryview(data).cast("B")
        while view:
            count = min(len(view), len(self.buffers[self.current]) - self.fill)
            self.buffers[self.current][self.fill:self.fill + count] = view[:count]
            view = view[count:]
            self._advance(count)

    def copy(self, source: Source, offset: int, count: int) -> None:
        """Appends ``count`` bytes of ``source`` from ``offset``, read straight into the
        buffer in pieces."""
        while count:
            piece = min(count, len(self.buffers[self.current]) - self.fill)
            with memoryview(self.buffers[self.current]) as whole:
                source.read_into(offset, whole[self.fill:self.fill + piece])
            offset, count = offset + piece, count - piece
            self._advance(piece)

    def zeros(self, count: int) -> None:
        self.append(bytes(count))

    def skip(self, count: int) -> None:
        """``count`` zero bytes left as a hole where whole blocks allow (the file must not
        have been reserved for them to stay holes)."""
        end = self.position + count
        start = end // BLOCK * BLOCK
        if start - self.position < 2 * BLOCK:
            self.zeros(count)
            return
        self.zeros(-self.position % BLOCK)
        self._flush(self.fill)
        self.offset = start
        self.zeros(end - start)

    def produce(self, nbytes: int, produce_into: Callable[[Any], None]) -> None:
        """``produce_into`` fills a flat uint8 tensor of the next ``nbytes`` bytes (every one
        of them: the buffer holds earlier bytes); the buffer grows to hold them whole."""
        import torch

        if not nbytes:
            return
        self._grow(self.current, self.fill + nbytes, keep=self.fill)
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
        bytes kept (never while it is being written: only the other one is)."""
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
                    if exc.errno in NO_ROOM:
                        raise no_room(self.size, exc, self.target) from None
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
