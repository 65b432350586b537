"""Test helpers: writes that fail as a file system makes them fail, for the writers' error and
fallback paths (both writers write through ``engine/appender``, with ``os.pwrite``)."""

from __future__ import annotations

import errno
import os

O_DIRECT = getattr(os, "O_DIRECT", 0)


def refuse_direct_io(monkeypatch) -> None:
    """From now on in the test, opening a file with ``O_DIRECT`` fails with EINVAL, as on
    a file system without direct I/O (some FUSE ones)."""
    opener = os.open

    def no_direct(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return opener(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


def fill_the_disk(monkeypatch) -> None:
    """From now on in the test, every ``os.pwrite`` fails with ENOSPC (a full disk)."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
