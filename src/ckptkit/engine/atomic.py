"""Atomic outputs: write beside the target, fsync, check, rename; never over an input.

A killed run leaves either the old target or none, never a half-written file under the
target's name: the data goes to a hidden temporary file in the same folder (so the final
rename cannot cross file systems), which is removed on any failure and renamed over the target
only once it is complete, synced and verified.

A run killed with SIGKILL (or by a power cut) cannot remove its temporary file, so each one
is named after its writer (``.NAME.PID@HOST.RANDOM.ckptkit-tmp``), and the next write of the
same target removes those whose writer is gone: same host, no such process. A writer on
another host (a shared network folder) is never judged from here.

An existing target is replaced (the old file stays whole until the new one is complete), and
said so through the ``ckptkit`` logger, which the command line prints as a note: re-running a
command is common, and a refusal without ``--force`` would fail every re-run for a file the
user named. Only regular files are replaced: a FIFO or a device under the output's name
(``-o /dev/null``) would be swapped for a regular file by the rename.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import socket
import stat

from ..errors import OutputError

TEMPORARY_SUFFIX = ".ckptkit-tmp"
log = logging.getLogger("ckptkit")


def check_output_path(target: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuses an output that is an input, a directory, something else than a regular file,
    or in a folder that does not exist."""
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise OutputError("the output path is a directory; give a file name", target)
    if not os.path.isdir(folder):
        raise OutputError(f"the output folder {folder} does not exist", target)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        mode = None  # a new name (or a dangling link, which the rename replaces)
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"the output path is {_kind(mode)}, not a regular file; ckptkit "
                          "replaces only regular files: give a new name", target)
    for path in inputs:
        same = os.path.realpath(path) == os.path.realpath(target)
        if not same and os.path.exists(target) and os.path.exists(path):
            same = os.path.samefile(path, target)
        if same:
            raise OutputError("the output would overwrite an input; choose another name",
                              target)


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "something else")


def temporary_prefix(target: str) -> tuple[str, str]:
    """The folder of ``target`` and the start of a temporary name beside it that says which
    process writes it; a random part and ``.ckptkit-tmp`` complete the name."""
    folder, name = os.path.split(os.path.abspath(target))
    return folder, f".{name}.{os.getpid()}@{_host()}."


def remove_stale_temporaries(target: str) -> None:
    """Removes the temporary files (or folders) of earlier writes of ``target`` whose writer
    process is gone; those of live writers, of other hosts and of other names stay."""
    folder, name = os.path.split(os.path.abspath(target))
    start = f".{name}."
    try:
        entries = [e for e in os.scandir(folder)
                   if e.name.startswith(start) and e.name.endswith(TEMPORARY_SUFFIX)]
    except OSError:
        return  # nothing to clean where nothing can be listed; the write itself will say
    for entry in entries:
        owner = entry.name[len(start):-len(TEMPORARY_SUFFIX)].rpartition(".")[0]
        pid, _, host = owner.partition("@")
        if not pid.isdigit() or host != _host() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@functools.cache
def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
        remove_stale_temporaries(self.target)
        folder, prefix = temporary_prefix(self.target)
        tmp_path = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            self.fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot create a file in {folder} ({exc.strerror})",
                              self.target) from None
        self.tmp_path = tmp_path  # only once it exists: nothing to remove before
        if os.path.lexists(self.target):
            log.info("replacing the existing %s", self.target)
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
