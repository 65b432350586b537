"""The work done for one file, and the loop of the child process that does it.

Every stage runs in a child process (``pool.Pool``), never in the process that collects the
results: a reader that hangs can be killed and one that crashes takes only its child down.
The stages are the ops every other command uses (``ops.scan.scan_file``,
``ops.inspect.inspect_file``, ``ops.model_hash.hash_file``), so a batch row says what
``ckpt scan``, ``ckpt inspect`` and ``ckpt hash`` say about the same file.

``header`` reads headers and pickles only (milliseconds a file); ``hashes`` reads the whole
file, and is a stage of its own so that the cheap answers are not queued behind it.

``CKPTKIT_BATCH_TEST_FAULTS`` (read by the collecting process and handed to its children) is
a test hook: ``crash:TEXT`` makes a child exit at once (as a segfault would) on any path
containing TEXT, ``hang:TEXT`` makes it sleep for ever. It only harms the run of whoever sets
it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import deque
from multiprocessing import forkserver
from typing import Any

from ..ops.inspect import inspect_file
from ..ops.model_hash import hash_file
from ..ops.scan import SAFE, scan_file
from . import rows

FAULTS_ENV = "CKPTKIT_BATCH_TEST_FAULTS"
OPS = ("scan", "inspect", "hash")
READY = "ready"
GROUP = 16  # answers a child sends at once
LINGER = 0.25  # seconds an answer may wait for the rest of its group


def header(op: str, path: str, size: int | None, mtime_ns: int | None) -> dict[str, Any]:
    """The row of ``path`` from its header: the scan verdict and findings, and for
    ``inspect`` what the file is. Never raises for anything the file holds."""
    result = scan_file(path)
    row = rows.from_scan(result, size, mtime_ns)
    if op == "inspect" and result.verdict == SAFE:
        try:
            report = inspect_file(path)
        except Exception as exc:  # the scan read it; an inspect failure is a row, not a stop
            row["error"] = rows.clip(f"identification failed: {_reason(exc)}")
        else:
            rows.add_identification(row, report)
    return row


def hashes(path: str) -> dict[str, Any]:
    """The hash columns of ``path`` (one full read: file hashes and component digests),
    or its ``error``."""
    try:
        # Not into the hash cache: see hashing.stream_digests.
        return rows.hash_columns(hash_file(path, digests=True, remember=False))
    except Exception as exc:
        return {"error": rows.clip(f"hashing failed: {_reason(exc)}")}


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"


def needs_hash(row: dict[str, Any]) -> bool:
    """Whether the hash stage reads the file: any file the listing could stat (an unsafe file
    is hashed too: a hub names what it blocks by its hash)."""
    return row["size"] is not None


STAGES = {"header": header, "hash": hashes}


def _fault(faults: list[tuple[str, str]], path: str) -> None:
    for action, text in faults:
        if text in path:
            if action == "crash":
                os._exit(77)
            if action == "hang":
                time.sleep(1e9)


def parse_faults(value: str | None) -> list[tuple[str, str]]:
    """``crash:TEXT,hang:TEXT`` as (action, text) pairs."""
    out = []
    for item in (value or "").split(","):
        action, _, text = item.partition(":")
        if action in ("crash", "hang") and text:
            out.append((action, text))
    return out


def _die_with_parent() -> None:
    """Makes sure a child does not outlive a run killed with SIGKILL (a reader hanging for
    ever). Linux kills the child when its parent, the forkserver, exits (PR_SET_PDEATHSIG);
    the forkserver exits when no process holds its "alive" pipe any more, and every child it
    forks is handed that pipe (``multiprocessing.forkserver._serve_one``), so the child
    closes its copy: then the run's own copy is the last, and the run's death ends all."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


class Current:
    """Which file a child is on, and since when, in shared memory: the number of files it
    has begun and when it began the last (the monotonic clock, shared by the machine), or
    -1 between files. The child writes it; the parent reads it whenever it needs to (a time
    limit, a death), so that answers need not come one by one."""

    def __init__(self, ctx):
        self.values = ctx.RawArray("d", 2)
        self.values[1] = -1.0

    def begin(self, count: int) -> None:
        self.values[1] = time.monotonic()
        self.values[0] = count

    def end(self) -> None:
        self.values[1] = -1.0

    def read(self) -> tuple[int, float]:
        while True:  # the child may write between the two reads
            begun, since = self.values[0], self.values[1]
            if self.values[0] == begun:
                return int(begun), since


def serve(conn, faults: list[tuple[str, str]], current: Current) -> None:
    """A child's loop: receives lists of ``(key, stage, args)``, sends back lists of
    ``(key, result)`` in order, in groups: when ``GROUP`` are done, when the oldest has
    waited ``LINGER`` seconds, and whenever it has nothing left to do (before it waits for
    the next list); ``None`` ends it. Which file it is on is in ``current``. It says
    ``READY`` first: a child's start (seconds on a loaded machine) is no file's time. The
    parent sends the next list while this one runs; the child takes it in before each
    group it sends, so a parent writing a list never waits on a child that is itself waiting
    to write (both pipes full: a deadlock). Ctrl-C is the run's to handle (it keeps what
    is done and stops the children): a child ignores it, rather than print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    conn.send(READY)
    todo: deque[tuple[Any, str, tuple]] = deque()
    done: list[tuple[Any, Any]] = []
    oldest = 0.0
    begun = 0
    try:
        while True:
            if not todo:
                if done:
                    conn.send(done)
                    done = []
                batch = conn.recv()
                if batch is None:
                    return
                todo.extend(batch)
            key, stage, args = todo.popleft()
            begun += 1
            current.begin(begun)
            if faults:
                _fault(faults, args[1] if stage == "header" else args[0])
            result = STAGES[stage](*args)
            current.end()
            if not done:
                oldest = time.monotonic()
            done.append((key, result))
            if len(done) >= GROUP or time.monotonic() - oldest >= LINGER:
                while conn.poll():
                    batch = conn.recv()
                    if batch is None:  # (sent only to a child with nothing queued)
                        return
                    todo.extend(batch)
                conn.send(done)
                done = []
    except EOFError:  # the parent is gone
        return
