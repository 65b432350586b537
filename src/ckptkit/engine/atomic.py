"""Atomic outputs: write beside the target, fsync, check, rename; never over an input.

A killed run leaves either the old target or none, never a half-written file under the
target's name: the data goes to a hidden temporary file in the same folder (so the final
rename cannot cross file systems), which is removed on any failure and renamed over the target
only once it is complete, synced and verified.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from ..errors import OutputError


def check_output_path(target: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuses an output that is an input, a directory, or in a folder that does not exist."""
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise OutputError("the output path is a directory; give a file name", target)
    if not os.path.isdir(folder):
        raise OutputError(f"the output folder {folder} does not exist", target)
    for path in inputs:
        same = os.path.realpath(path) == os.path.realpath(target)
        if not same and os.path.exists(target) and os.path.exists(path):
            same = os.path.samefile(path, target)
        if same:
            raise OutputError("the output would overwrite an input; choose another name",
                              target)


class AtomicOutput:
    """``with AtomicOutput(target, inputs) as out:`` write to ``out.fd``, then ``out.commit()``.

    Leaving the block without ``commit`` (an error, Ctrl-C) deletes the temporary file.
    """

    def __init__(self, target: str, inputs: tuple[str, ...] = (), fsync: bool = True):
        self.target = os.fspath(target)
        self.inputs = inputs
        self.fsync = fsync
        self.fd = -1
        self.tmp_path = ""
        self._done = False

    def __enter__(self) -> AtomicOutput:
        check_output_path(self.target, self.inputs)
        folder, name = os.path.split(os.path.abspath(self.target))
        tmp_path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.ckptkit-tmp")
        try:
            self.fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot create a file in {folder} ({exc.strerror})",
                              self.target) from None
        self.tmp_path = tmp_path  # only once it exists: nothing to remove before
        return self

    def commit(self) -> None:
        """Makes the written file the target: sync, close, rename, sync the folder."""
        if self.fsync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp_path, self.target)
        self._done = True
        if self.fsync:
            folder = os.open(os.path.dirname(os.path.abspath(self.target)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._done and self.tmp_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
