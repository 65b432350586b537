"""A pool of child processes that does the per-file work under a per-file time limit.

``concurrent.futures`` and ``multiprocessing.Pool`` cannot stop one task: a reader that hangs
holds its worker for ever, and a worker that dies breaks the whole pool. Here each child gets
a short list of files and answers file by file, so the parent always knows which file a child
is on and since when (the child stamps each answer with the machine's monotonic clock). A
child is sent its next list while it still works on the last one: a child that waited for the
parent between lists (to read the answers, write Parquet, walk the listing, be scheduled on a
busy machine) sat idle most of the time, and two children ran no faster than one process.

- a file still running after its limit gets its child killed (SIGKILL) and a ``Failure``
  "timed out after S s"; it is not retried (a hang is a property of the file);
- a child that dies (``os._exit``, a segfault, the OOM killer, someone's ``kill``) loses the
  file it was on, which is tried once more on a fresh child, alone, and then gets a
  ``Failure`` naming how the child died; the files queued behind it are sent again as if
  nothing had happened;
- a child is replaced after ``RECYCLE`` files, so that whatever a reader leaks stays
  bounded.

Children start from a forkserver that has imported ``batch.work`` once (fast starts without
forking the parent's threads: the parent may be a Ray actor). The same pool runs a whole
local run (``workers`` children) and, with one child, each batch of a Ray actor.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
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
BATCH = 8  # files sent to a child at once; it gets the next list while on its last BATCH
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
    sent: float = 0.0  # when it was sent to its child: it cannot have started before


@dataclass
class Failure:
    """What a task gets instead of a result when its child was killed or died."""

    message: str


@dataclass(eq=False)  # children are compared by identity
class _Child:
    process: Any
    conn: Any
    queued: deque[Task] = field(default_factory=deque)  # sent, not answered yet, in order
    since: float = 0.0  # when its first queued file started
    files: int = 0
    alone: bool = False  # on a retry: nothing is sent behind it, so a death is its own


def _context():
    """The forkserver context, its server importing once what every child needs: the
    per-file work, and what the main module imports. Each child runs the main module again
    (as ``__mp_main__``: multiprocessing's rule; its ``'__main__'`` preload is not passed
    the main's path before Python 3.13); for ``ckpt``, whose main imports every command,
    that cost 0.2-0.35 CPU-s and up to 2 s a child on a busy machine, seven times in a run
    of 10,000 files. With the CLI (or the module run by ``python -m``) imported by the
    server, running the main again costs milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    cli = [CLI] if CLI in sys.modules else []
    ctx.set_forkserver_preload(["ckptkit.batch.work", *cli, *([name] if name else [])])
    return ctx


def start_server() -> None:
    """Starts the forkserver now (it imports the work while the caller does other things),
    not when the first child is needed."""
    _context()
    forkserver.ensure_running()


class Pool:
    def __init__(self, workers: int, faults: list[tuple[str, str]] | None = None,
                 recycle: int = RECYCLE):
        self.workers = max(1, workers)
        self.faults = faults or []
        self.recycle = recycle
        self._ctx = _context()
        self._children: list[_Child] = []
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
                while source is not None and len(self._queues["header"]) < 4 * BATCH * \
                        self.workers:
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
        up to ``workers``), so that none waits for the parent between lists."""
        now = time.monotonic()
        room = [c for c in self._children if not c.alone and len(c.queued) <= BATCH
                and c.files + len(c.queued) < self.recycle and c.process.is_alive()]
        spent = [c for c in self._children if not c.queued
                 and (c.files >= self.recycle or not c.process.is_alive())]
        for child in room + spent + [None] * (self.workers - len(self._children)):
            backlog = len(self._queues["hash"]) >= HASH_BACKLOG * self.workers
            stage = "header" if self._queues["header"] and not backlog else "hash"
            queue = self._queues[stage]
            if not queue:
                return
            retry = queue[0].tries > 0
            if child is not None and child.queued and retry:
                continue  # a retry waits for a child with nothing else to do
            if child in spent:
                self._stop(child)
                child = None
            child = child or self._start()
            if retry or stage == "hash":
                batch = [queue.popleft()]
            else:
                batch = []
                while queue and len(batch) < BATCH and not queue[0].tries:
                    batch.append(queue.popleft())
            if not child.queued:
                child.since = now
            for task in batch:
                task.sent = now
            child.queued.extend(batch)
            child.alone = retry
            with contextlib.suppress(OSError):  # it died: _read finds out and says so
                child.conn.send([(t.key, t.stage, t.args) for t in batch])

    def _collect(self, busy: list[_Child]) -> Iterator[tuple[Task, Any]]:
        now = time.monotonic()
        deadline = min(c.since + c.queued[0].limit for c in busy)
        ready = wait([c.conn for c in busy] + [c.process.sentinel for c in busy],
                     timeout=max(0.0, deadline - now))
        for child in busy:
            if child.conn in ready or child.process.sentinel in ready:
                yield from self._read(child)
        now = time.monotonic()
        for child in busy:
            if child.queued and now - child.since > child.queued[0].limit:
                yield from self._read(child)  # an answer may have come in meanwhile
                if child.queued and now - child.since > child.queued[0].limit:
                    task = child.queued[0]
                    self._lose(child)
                    yield task, Failure(f"timed out after {round(task.limit, 1):g} s (the "
                                        "reader was stopped)")

    def _read(self, child: _Child) -> Iterator[tuple[Task, Any]]:
        try:
            while child.queued and child.conn.poll():
                key, result, when = child.conn.recv()
                task = child.queued.popleft()
                if key != task.key:  # children answer in order; anything else is a bug
                    raise RuntimeError(f"a child answered for {key!r}, not {task.key!r}")
                child.files += 1
                if child.queued:  # the next file started when this one ended, or on arrival
                    child.since = max(when, child.queued[0].sent)
                else:
                    child.alone = False
                yield task, result
        except (EOFError, OSError):
            pass
        if child.queued and not child.process.is_alive():
            task = child.queued[0]
            code = child.process.exitcode
            self._lose(child)
            task.tries += 1
            if task.tries >= 2:
                yield task, Failure(f"the reader crashed twice ({_death(code)})")
            else:
                self._queues[task.stage].appendleft(task)

    def _lose(self, child: _Child) -> None:
        """Kills ``child`` and queues again the files it had not started."""
        child.queued.popleft()
        for task in reversed(child.queued):
            self._queues[task.stage].appendleft(task)
        child.queued.clear()
        child.process.kill()
        child.process.join()
        child.conn.close()
        self._children.remove(child)

    def _start(self) -> _Child:
        """A new child, once it says it is ready (its start is no file's time)."""
        parent, there = self._ctx.Pipe()
        process = self._ctx.Process(target=work.serve, args=(there, self.faults), daemon=True)
        process.start()
        there.close()
        try:
            ready = parent.recv() if parent.poll(START_LIMIT) else None
        except EOFError:
            ready = None
        if ready != work.READY:
            process.kill()
            process.join()
            raise RuntimeError(f"a worker process did not start within {START_LIMIT} s "
                               f"({_death(process.exitcode)})")
        child = _Child(process, parent)
        self._children.append(child)
        return child

    def _stop(self, child: _Child) -> None:
        with contextlib.suppress(OSError):
            child.conn.send(None)
        child.process.join(5)
        if child.process.is_alive():
            child.process.kill()
            child.process.join()
        child.conn.close()
        self._children.remove(child)

    def close(self) -> None:
        for child in list(self._children):
            child.process.kill()
            child.process.join()
            child.conn.close()
        self._children.clear()


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"its process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"its process was killed by signal {-code}"
    return f"its process exited with code {code}"
