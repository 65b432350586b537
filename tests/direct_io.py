"""Test helper: a file system that refuses direct I/O, for the writers' buffered path."""

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
