"""A batch run: the listing in, each file's stages done by a pool or on Ray, the rows out."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import UnsafeFileError, UsageError, worse_exit
from ..ops.scan import ERROR, UNSAFE
from . import listing, rows, work
from .pool import Failure, Pool, Task, start_server, stop_server
from .results import FLUSH_ROWS, Counts, Results, row_key

HASH_RATE = 16 << 20  # bytes/s: the hash stage's limit is --timeout plus the file at this rate


class Progress(Protocol):
    def start(self, total_bytes: int, total_items: int) -> None: ...
    def update(self, nbytes: int, items: int = 0) -> None: ...
    def failed(self) -> None: ...


@dataclass
class Summary:
    output: str
    files: int = 0  # rows in the output
    done: int = 0  # files done by this run
    resumed: int = 0  # files skipped as already done (--resume)
    duplicates: int = 0  # files given more than one row by the parts (see Results.finish)
    verdicts: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # rows with an error (a verdict "error", or a failed stage)
    seconds: float = 0.0
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        rate = self.done / self.seconds if self.seconds else 0.0
        return {**self.__dict__, "files_per_second": round(rate, 1)}


def hash_limit(timeout: float, size: int) -> float:
    return timeout + size / HASH_RATE


class _Quiet:
    def start(self, total_bytes: int, total_items: int) -> None:
        pass

    def update(self, nbytes: int, items: int = 0) -> None:
        pass

    def failed(self) -> None:
        pass


def run_batch(op: str, sources: list[str], output: str, *, ray: str | None = None,
              resume: bool = False, workers: int | None = None, timeout: float = 60.0,
              progress: Progress | None = None, flush_rows: int = FLUSH_ROWS) -> Summary:
    """Does ``op`` ("scan", "inspect" or "hash") for every file of ``sources`` and writes
    RESULTS (see the package docstring). An interrupt leaves the rows done in RESULTS.parts
    (``Results``, which writes a part every ``flush_rows`` rows or 10 s) and propagates."""
    if op not in work.OPS:
        raise UsageError(f"the batch operation must be one of {', '.join(work.OPS)}")
    if timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    if importlib.util.find_spec("pyarrow") is None:  # (the results are Parquet)
        raise UsageError("ckpt batch writes Parquet: pip install 'ckptkit[batch]' "
                         "(pyarrow)")
    if ray is None:
        start_server()  # before any thread: it may be a fork of this process
        _import_soon("pyarrow.parquet", "pyarrow.compute")
    try:
        return _run(op, sources, output, ray, resume, workers, timeout, progress, flush_rows)
    finally:
        stop_server()  # (the fork's: see pool.stop_server)


def _run(op: str, sources: list[str], output: str, ray: str | None, resume: bool,
         workers: int | None, timeout: float, progress: Progress | None,
         flush_rows: int) -> Summary:
    """``run_batch`` once its arguments are checked and its forkserver started."""
    listing.check_sources(sources)
    results = Results(output, resume, flush_rows)
    progress = progress or _Quiet()
    summary = Summary(output)
    previous = results.previous() if resume else {}
    listed: set[bytes] | None = set() if resume else None
    faults = work.parse_faults(os.environ.get(work.FAULTS_ENV))
    started = time.monotonic()

    def todo() -> Iterator[tuple[str, int, int] | dict[str, Any]]:
        for item in listing.files(sources):
            key = row_key(item) if isinstance(item, dict) else os.fsencode(item[0])
            if listed is not None:
                listed.add(key)
            if isinstance(item, tuple) and previous.get(key) == item[1:]:
                summary.resumed += 1
                continue
            yield item

    def emit(row: dict[str, Any]) -> None:
        results.add(row)
        summary.done += 1
        progress.update(row["size"] or 0, 1)
        if row["error"] is not None:
            progress.failed()

    try:
        if ray is None:
            _local(op, todo(), emit, progress, workers or os.cpu_count() or 1, timeout, faults)
        else:
            from .on_ray import run_on_ray

            run_on_ray(op, todo(), results, summary, progress, ray, workers, timeout, faults)
    except BaseException:
        results.flush()  # what is done stays done (an interrupt, a lost cluster)
        raise
    counts = results.finish(listed)
    summary.seconds = time.monotonic() - started
    _tally(summary, counts)
    return summary


def _import_soon(*names: str) -> None:
    """Imports ``names`` in a thread (pyarrow: 0.2 CPU-s, before the first part is written):
    imported first, they kept the children from their first files, on a 2-core machine a
    fiftieth of a 10,000-file run with one core idle; imported by the first part, they
    stalled the loop that feeds the children, which ran out of files meanwhile. A failed
    import is left to the code that needs the module, which says why."""
    def load() -> None:
        for name in names:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    threading.Thread(target=load, name="ckptkit-import", daemon=True).start()


def _local(op: str, items, emit, progress: Progress, workers: int, timeout: float,
           faults) -> None:
    pool = Pool(workers, faults)
    held: dict[int, dict[str, Any]] = {}

    def tasks() -> Iterator[Task]:
        for key, item in enumerate(items):
            if isinstance(item, dict):
                progress.start(0, 1)
                emit(item)
                continue
            path, size, mtime = item
            progress.start(size, 1)
            yield Task(key, "header", (op, path, size, mtime), timeout)

    try:
        for task, result in pool.run(tasks()):
            if task.stage == "header":
                _, path, size, mtime = task.args
                row = (result if not isinstance(result, Failure)
                       else rows.error_row(path, size, mtime, result.message))
                if op == "hash" and work.needs_hash(row):
                    held[task.key] = row
                    pool.add(Task(task.key, "hash", (path,), hash_limit(timeout, size)))
                else:
                    emit(row)
            else:
                row = held.pop(task.key)
                if isinstance(result, Failure):
                    row["error"] = rows.clip(f"hashing: {result.message}")
                else:
                    row.update(result)
                emit(row)
    finally:
        pool.close()  # no child left idle through the final merge


def _tally(summary: Summary, counts: Counts) -> None:
    """Counts and the exit code over the final rows (``ops.scan.exit_code``'s table: 4 when
    any file is unsafe, else 70 when ckptkit failed on one, else 3 when any failed)."""
    summary.files, summary.verdicts = counts.rows, dict(counts.verdicts)
    summary.errors, summary.duplicates = counts.errors, counts.duplicates
    code = 0
    if summary.verdicts.get(UNSAFE):
        code = worse_exit(code, UnsafeFileError.exit_code)
    if counts.internal:
        code = worse_exit(code, 70)
    if summary.errors or summary.verdicts.get(ERROR):
        code = worse_exit(code, 3)
    summary.exit_code = code
