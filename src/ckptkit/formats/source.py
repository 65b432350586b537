"""An input file held open for reading ranges: the one place formats/ touches file bytes.

Readers parse headers with ``read``; lazy tensors later fetch their bytes with ``read``
(a private copy of just that range, freed when the tensor goes) or view them through ``mmap``
(zero-copy). The map is copy-on-write: torch gets a writable buffer without any write ever
reaching the input file.
"""

from __future__ import annotations

import mmap
import os

from ..errors import FormatError


class Source:
    """An open file. ``read(offset, n)`` returns exactly ``n`` bytes or raises ``FormatError``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._map: mmap.mmap | None = None

    def read(self, offset: int, n: int) -> bytearray:
        self._check(offset, n)
        buf = bytearray(n)
        self.read_into(offset, memoryview(buf))
        return buf

    def _check(self, offset: int, n: int) -> None:
        if self._fd < 0:
            raise FormatError("the checkpoint was closed before this tensor was read",
                              self.path)
        if offset < 0 or n < 0 or offset + n > self.size:
            raise FormatError(f"needs bytes {offset}..{offset + n} but the file has only "
                              f"{self.size} (truncated?)", self.path)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fills ``view`` (bytes) from ``offset``: a caller reading many ranges reuses one
        buffer, where a new one each time costs a page fault per page it touches."""
        n = len(view)
        self._check(offset, n)
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise FormatError(f"the file ended at byte {offset + done} while reading "
                                  f"{n} bytes at {offset} (truncated, or changed while open?)",
                                  self.path)
            done += got

    def mmap(self) -> mmap.mmap:
        if self._fd < 0:
            raise FormatError("the checkpoint was closed before this tensor was loaded",
                              self.path)
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        return self._map

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_map(self) -> mmap.mmap:
        """A new read-only map of the whole file, for parsing it in place; the caller closes
        it. Unlike ``mmap``'s private copy it commits no memory, however large the file."""
        if self._fd < 0:
            raise FormatError("the checkpoint was closed before it was read", self.path)
        return mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        # The map is never closed here: tensors from ``load`` hold a reference to it (but no
        # buffer export, so closing would unmap memory under them); it is unmapped when the
        # last of them goes.
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
