"""A pool of child processes that does the per-file work under a per-file time limit.

``concurrent.futures`` and ``multiprocessing.Pool`` cannot stop one task: a reader that hangs
holds its worker for ever, and a worker that dies breaks the whole pool. Here each child gets
lists of files and says in a few bytes of shared memory (``work.Current``) which file it is
on and since when (the machine's monotonic clock), so the parent always knows, without a
message per file: the child sends its answers in groups (``work.GROUP``; a message per file
cost the parent a wake-up and two reads of a pipe each, a tenth of its CPU). A child is sent
its next list while it still works on the last one: a child that waited for the parent
between lists (to read the answers, write Parquet, walk the listing, be scheduled on a busy
machine) sat idle most of the time, and two children ran no faster than one process.

- a file still running after its limit gets its child killed (SIGKILL) and a ``Failure``
  "timed out after S s"; it is not retried (a hang is a property of the file);
- a child that dies (``os._exit``, a segfault, the OOM killer, someone's ``kill``) loses the
  file it was on (or, between files, the next one), which is tried once more on a fresh
  child, alone, and then gets a ``Failure`` naming how the child died; the files queued
  behind it, and those it had done but not yet answered, are sent again as if nothing had
  happened;
- a child is replaced after ``RECYCLE`` files, so that whatever a reader leaks stays
  bounded.

Children start from a forkserver (multiprocessing's): a child starts in about 10 ms, without
forking the parent's threads (the parent may be a Ray actor, or hold Arrow's threads). A
local run starts the server first thing (``start_server``), as a fork of itself while it has
no thread yet: everything the children need is imported already, so the first files start at
once. A fresh server (multiprocessing's own, when the run has threads, or on Ray) imports
``batch.work`` and the CLI first: 0.4-0.6 CPU-s with the other core idle on a 2-core machine
(the first answer came 0.47 s after the server's start, 0.1 s from a fork). Children start
without the parent waiting: each says READY (a start is no file's time; a file's time counts
from when the child begins it). The same pool runs a whole local run (``workers`` children)
and, with one child, each batch of a Ray actor.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.connection import wait
from typing import Any

from . import work

RECYCLE = 2000  # files a child handles before it is replaced
BATCH = 2 * work.GROUP  # files sent to a child at once; it gets the next list while on its
# last BATCH, so that it has files to do while its group of answers waits for the parent
START_LIMIT = 120  # seconds a new child may take to start
CLI = "ckptkit.cli.main"  # imported by the forkserver when the run is the CLI
HASH_BACKLOG = 4  # hash tasks per worker that may wait before they go ahead of headers


@dataclass
class Task:
    key: Any
    stage: str  # "header" or "hash" (work.STAGES)
    args: tuple
    limit: float  # seconds this file may take
    tries: int = 0


@dataclass
class Failure:
    """What a task gets instead of a result when its child was killed or died."""

    message: str


@dataclass(eq=False)  # children are compared by identity
class _Child:
    process: Any
    conn: Any
    current: work.Current
    queued: deque[Task] = field(default_factory=deque)  # sent, not answered yet, in order
    ready: bool = False  # it said READY
    started: float = 0.0  # when it was started
    files: int = 0  # answered
    alone: bool = False  # on a retry: nothing is sent behind it, so a death is its own

    def on(self) -> tuple[int, float] | None:
        """The index in ``queued`` of the file it is on, and since when; None between
        files (or before the first)."""
        begun, since = self.current.read()
        index = begun - 1 - self.files
        return (index, since) if since >= 0 and 0 <= index < len(self.queued) else None


def _context():
    """The forkserver context, its server importing once what every child needs: the
    per-file work, and what the main module imports. Each child runs the main module again
    (as ``__mp_main__``: multiprocessing's rule; its ``'__main__'`` preload is not passed
    the main's path before Python 3.13); for ``ckpt``, whose main imports every command,
    that cost 0.2-0.35 CPU-s and up to 2 s a child on a busy machine, seven times in a run
    of 10,000 files; in a Ray actor, whose main is Ray's worker script, it imported Ray
    (0.4-0.6 CPU-s a child). With the CLI, the module run by ``python -m`` or the main
    script's module (``_script_module``) imported by the server, running the main again
    costs milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None) or _script_module(main)
    cli = [CLI] if CLI in sys.modules else []
    ctx.set_forkserver_preload(["ckptkit.batch.work", *cli, *([name] if name else [])])
    return ctx


def _script_module(main) -> str | None:
    """The name under which the main script is importable from a folder of ``sys.path``
    other than its own (which the forkserver's path lacks): for a Ray worker,
    ``ray._private.workers.default_worker``. Importing it runs the script's imports and
    definitions, not its ``if __name__ == "__main__"`` part; a name that cannot be imported
    is skipped by the server."""
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    path = os.path.abspath(path)
    for folder in sys.path:
        folder = os.path.abspath(folder or os.curdir)
        if folder == os.path.dirname(path) or not path.startswith(folder + os.sep):
            continue
        parts = os.path.relpath(path, folder)[:-3].split(os.sep)
        if all(part.isidentifier() for part in parts):
            return ".".join(parts)
    return None


_forked: int | None = None  # the forkserver this process forked (start_server), while it runs


def start_server() -> None:
    """Starts the forkserver now, not when the first child is needed: a fork of this process
    when it can be (``_fork_server``; ended by ``stop_server``), else a fresh one, which
    imports the work while the caller does other things."""
    global _forked
    _context()
    _forked = _fork_server()
    if _forked is None:
        forkserver.ensure_running()


def stop_server() -> None:
    """Ends the forkserver ``start_server`` forked, if any. It holds whatever this process
    had open when it was forked (a library caller's files and sockets), so it lives as long
    as the run, not as long as the process; a fresh server lives with the process, as
    multiprocessing has it."""
    global _forked
    server = getattr(forkserver, "_forkserver", None)
    if _forked is None or getattr(server, "_forkserver_pid", None) != _forked:
        return
    from multiprocessing import util

    os.close(server._forkserver_alive_fd)  # its end of file: the server returns
    deadline = time.monotonic() + 5  # (a child of the run's still alive holds the pipe)
    with contextlib.suppress(ChildProcessError):  # (reaped already)
        while not os.waitpid(_forked, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(_forked, signal.SIGKILL)
                os.waitpid(_forked, 0)
                break
            time.sleep(0.001)
    if not util.is_abstract_socket_namespace(server._forkserver_address):
        with contextlib.suppress(OSError):
            os.unlink(server._forkserver_address)
    server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
    _forked = None


def _fork_server() -> int | None:
    """Starts multiprocessing's forkserver as a fork of this process, as
    ``ForkServer.ensure_running`` starts it in a fresh interpreter (a listening socket, an
    "alive" pipe whose end of file stops it), when this process has a single thread (a fork
    keeps only the calling thread: a lock another one held would stay held) and no server
    yet; returns its pid. Its children are forks of it, started as from a fresh server
    (``spawn._main``: the main module is the one they already hold, so it is not run again).
    None when it cannot (other threads, a server already there, a multiprocessing whose
    forkserver lacks what this sets): ``ensure_running`` then starts a fresh one."""
    from multiprocessing import connection, resource_tracker, util

    server = getattr(forkserver, "_forkserver", None)
    names = ("_forkserver_pid", "_forkserver_address", "_forkserver_alive_fd")
    if not all(hasattr(server, n) for n in names) or server._forkserver_pid is not None:
        return None
    resource_tracker.ensure_running()  # (as ensure_running does: the children get its pipe)
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return None
    except OSError:
        return None
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # (what is buffered is written once, not by both)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(alive_w)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh interpreter
                forkserver.main(listener.fileno(), alive_r, [])
            finally:
                os._exit(0)
        os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid
    return pid


class Pool:
    def __init__(self, workers: int, faults: list[tuple[str, str]] | None = None,
                 recycle: int = RECYCLE):
        self.workers = max(1, workers)
        self.faults = faults or []
        self.recycle = recycle
        self._ctx = _context()
        self._children: list[_Child] = []
        self._stopped: list[Any] = []  # processes of children told to exit, not joined yet
        self._queues: dict[str, deque[Task]] = {"header": deque(), "hash": deque()}

    def add(self, task: Task) -> None:
        """Queues a task while ``run`` is going (the hash stage of a file whose header is
        done). Header tasks are sent first, until ``HASH_BACKLOG`` hash tasks per worker
        wait: the rows waiting for their hashes stay few, whatever the listing's length."""
        self._queues[task.stage].append(task)

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        """Each task with its result (or a ``Failure``) as it is done, tasks pulled from
        ``tasks`` only as children need them (a listing may be walked lazily)."""
        source: Iterator[Task] | None = iter(tasks)
        try:
            while True:
                # Before the children start, only their first lists: they start on them
                # while the listing is walked on.
                ahead = (4 if self._children else 1) * BATCH * self.workers
                while source is not None and len(self._queues["header"]) < ahead:
                    task = next(source, None)
                    if task is None:
                        source = None
                    else:
                        self.add(task)
                self._dispatch()
                busy = [c for c in self._children if c.queued]
                if not busy:
                    if source is None and not any(self._queues.values()):
                        return
                    continue
                yield from self._collect(busy)
        except BaseException:  # stopped early (an interrupt, the consumer gone): no orphans
            self.close()
            raise

    def _dispatch(self) -> None:
        """Sends each child with at most ``BATCH`` files left its next list (new children
        up to ``workers``), so that none waits for the parent between lists. A child sent
        its last files before ``recycle`` has a successor at once, which works while it
        finishes them (rather than a core idle while it exits and the next one starts)."""
        for child in [c for c in self._children if not c.queued and (
                c.files >= self.recycle or not c.process.is_alive())]:
            self._stop(child)
        active = [c for c in self._children if c.files + len(c.queued) < self.recycle]
        room = [c for c in active if not c.alone and len(c.queued) <= BATCH
                and c.process.is_alive()]
        # The last files shared out, not all to the first child that asks.
        share = -(-len(self._queues["header"]) // self.workers)
        for child in room + [None] * (self.workers - len(active)):
            backlog = len(self._queues["hash"]) >= HASH_BACKLOG * self.workers
            stage = "header" if self._queues["header"] and not backlog else "hash"
            queue = self._queues[stage]
            if not queue:
                return
            retry = queue[0].tries > 0
            if child is not None and child.queued and retry:
                continue  # a retry waits for a child with nothing else to do
            child = child or self._start()
            if retry or stage == "hash":
                batch = [queue.popleft()]
            else:
                batch = []
                while queue and len(batch) < min(BATCH, share) and not queue[0].tries:
                    batch.append(queue.popleft())
            child.queued.extend(batch)
            child.alone = retry
            with contextlib.suppress(OSError):  # it died: _read finds out and says so
                child.conn.send([(t.key, t.stage, t.args) for t in batch])

    def _collect(self, busy: list[_Child]) -> Iterator[tuple[Task, Any]]:
        now = time.monotonic()
        deadlines = [self._deadline(c) for c in busy]
        ready = wait([c.conn for c in busy] + [c.process.sentinel for c in busy],
                     timeout=max(0.0, min(deadlines) - now))
        for child in busy:
            if child.conn in ready or child.process.sentinel in ready:
                yield from self._read(child)
        for child in busy:
            if child.queued and time.monotonic() > self._deadline(child):
                yield from self._read(child)  # answers may have come in meanwhile
                if not child.queued:
                    continue
                if not child.ready:
                    self._lose(child, None)
                    raise RuntimeError(f"a worker process did not start within "
                                       f"{START_LIMIT} s")
                at = child.on()
                if at is not None and time.monotonic() - at[1] > child.queued[at[0]].limit:
                    task = child.queued[at[0]]
                    self._lose(child, at[0])
                    yield task, Failure(f"timed out after {round(task.limit, 1):g} s (the "
                                        "reader was stopped)")

    @staticmethod
    def _deadline(child: _Child) -> float:
        """When the file ``child`` is on will have run out of time (or its start, if it has
        not said READY yet); between files, a short while (the next file's start is not
        announced)."""
        if not child.ready:
            return child.started + START_LIMIT
        at = child.on()
        if at is None:
            return time.monotonic() + work.LINGER
        return at[1] + child.queued[at[0]].limit

    def _read(self, child: _Child) -> Iterator[tuple[Task, Any]]:
        try:
            while child.queued and child.conn.poll():
                message = child.conn.recv()
                if message == work.READY:
                    child.ready = True
                    continue
                for key, result in message:
                    task = child.queued.popleft()
                    if key != task.key:  # children answer in order; anything else is a bug
                        raise RuntimeError(f"a child answered for {key!r}, not {task.key!r}")
                    child.files += 1
                    yield task, result
                if not child.queued:
                    child.alone = False
        except (EOFError, OSError):
            pass
        if child.queued and not child.process.is_alive():
            if not child.ready:
                code = child.process.exitcode
                self._lose(child, None)
                raise RuntimeError(f"a worker process did not start ({_death(code)})")
            at = child.on()
            # Between files (or dead before its first): the next file takes the blame, so
            # that a child that keeps dying cannot hold the run for ever.
            index = at[0] if at is not None else max(0, child.current.read()[0]
                                                      - child.files)
            index = min(index, len(child.queued) - 1)
            task = child.queued[index]
            code = child.process.exitcode
            self._lose(child, index)
            task.tries += 1
            if task.tries >= 2:
                yield task, Failure(f"the reader crashed twice ({_death(code)})")
            else:
                self._queues[task.stage].appendleft(task)

    def _lose(self, child: _Child, index: int | None) -> None:
        """Kills ``child`` and queues again the files it had not answered, but for the one
        at ``index`` (the file it was on), which the caller decides about."""
        for i, task in reversed(list(enumerate(child.queued))):
            if i != index:
                self._queues[task.stage].appendleft(task)
        child.queued.clear()
        child.process.kill()
        child.process.join()
        child.conn.close()
        self._children.remove(child)

    def _start(self) -> _Child:
        """A new child; it says READY once started (its start is no file's time: a file's
        time counts from when the child says it began it)."""
        parent, there = self._ctx.Pipe()
        current = work.Current(self._ctx)
        process = self._ctx.Process(target=work.serve, args=(there, self.faults, current),
                                    daemon=True)
        process.start()
        there.close()
        child = _Child(process, parent, current, started=time.monotonic())
        self._children.append(child)
        return child

    def _stop(self, child: _Child) -> None:
        """Tells ``child`` (nothing queued) to exit, without waiting for it to (its
        interpreter's end: milliseconds, more on a busy machine); ``close`` joins it."""
        with contextlib.suppress(OSError):
            child.conn.send(None)
        child.conn.close()
        self._children.remove(child)
        self._stopped = [p for p in self._stopped if p.is_alive()] + [child.process]

    def close(self) -> None:
        for child in list(self._children):
            child.process.kill()
            child.process.join()
            child.conn.close()
        self._children.clear()
        for process in self._stopped:  # told to exit: gone, or about to be
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self._stopped.clear()


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"its process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"its process was killed by signal {-code}"
    return f"its process exited with code {code}"
