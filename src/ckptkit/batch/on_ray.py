"""The same run on a Ray cluster, through Ray Data (``pip install ckptkit[ray]``).

The driver walks the listing on a thread of its own as the run goes, putting blocks of
``BATCH`` ``(file, size, mtime)`` rows (the path's exact bytes; never the file's content: a
24 GB file must not pass through the object store) on a Ray queue (at most ``QUEUED``
blocks: the walk waits for the workers, not the other way round). The dataset's source is
one read task (no CPU of its own) that takes the blocks off the queue as they come, so the
first rows are done while the walk goes on, as in the local pool. ``map_batches`` runs the
header stage on a pool of actors, and for ``hash`` the full-read stage as a second
``map_batches`` with its own pool, so the cheap answers are not queued behind the reads.
Each actor does its files in one child process of its own (``pool.Pool`` with one worker):
the per-file time limit and the crash-and-retry-once rules are the local run's, applied
inside the task, and a file that hangs or crashes costs its actor nothing more than a fresh
child. An actor that dies (its process
killed, its node lost) is restarted by Ray Data and its batch is run again (Ray Data's
defaults for actors: ``max_restarts=-1``, ``max_task_retries=-1``); the rows of a failed
attempt never reach the driver, which writes each row it receives once (``Results``).

Every node needs ckptkit (the same version) importable by its Ray workers, and the files at
the same paths as the driver sees them (a shared file system).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from queue import SimpleQueue
from typing import Any

from . import rows
from .pool import Failure, Pool, Task, start_server

BATCH = 100  # files per Ray batch (one actor call)
QUEUED = 64  # blocks of files walked ahead of the workers, at most
# Ray Data gathers what a read task yields into blocks of its context's
# ``target_max_block_size`` (128 MiB) before passing them on: the whole walk, for a listing
# under a million files. The run's dataset gets this instead (a block of files is ~10 KiB; a
# block of rows larger than 1.5 times it is cut into pieces of it on the way back).
BLOCK_BYTES = 32 << 10


class _Stage:
    """A Ray Data callable class: one stage over a batch of files, in a child process."""

    def __init__(self, stage: str, op: str, timeout: float, faults: list[tuple[str, str]]):
        self.stage, self.op, self.timeout = stage, op, timeout
        self.pool = Pool(1, faults)
        start_server()  # its imports overlap the wait for the first batch

    def __call__(self, batch):
        if self.stage == "header":
            return self._header(batch)
        return self._hash(batch)

    def _header(self, batch):
        files = batch.column("file").to_pylist()
        sizes = batch.column("size").to_pylist()
        mtimes = batch.column("mtime").to_pylist()
        tasks = [Task(i, "header", (self.op, os.fsdecode(f), s, m), self.timeout)
                 for i, (f, s, m) in enumerate(zip(files, sizes, mtimes, strict=True))]
        out: list[Any] = [None] * len(tasks)
        for task, result in self.pool.run(tasks):
            _, path, size, mtime = task.args
            out[task.key] = (result if not isinstance(result, Failure)
                             else rows.error_row(path, size, mtime, result.message))
        return rows.table(out)

    def _hash(self, batch):
        from .run import hash_limit
        from .work import needs_hash

        out = batch.to_pylist()
        tasks = [Task(i, "hash", (os.fsdecode(r["path_bytes"] or r["path"].encode()),),
                      hash_limit(self.timeout, r["size"]))
                 for i, r in enumerate(out) if needs_hash(r)]
        for task, result in self.pool.run(tasks):
            if isinstance(result, Failure):
                out[task.key]["error"] = rows.clip(f"hashing: {result.message}")
            else:
                out[task.key].update(result)
        return rows.table(out)


def _connect(address: str, workers: int | None):
    # Ray Data records its usage in an actor of its own, started for the run: a Ray worker
    # process (2 CPU-s to start, of a run's ~40 on 2 cores). Ray's usage stats are off on a
    # cluster started with --disable-usage-stats; this is Ray Data's own switch (read in
    # the driver).
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING,
             "configure_logging": True}
    if address == "local":
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return ray


def _walked(queue):
    """A Ray Data source of one read task: the blocks the driver's walk puts on ``queue``,
    until a ``None``."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class Walked(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                while (block := queue.get()) is not None:
                    yield block

            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None,
                                                 exec_stats=None, input_files=None))]

    return Walked()


def _walk(items, queue, decided: SimpleQueue, failed: list[BaseException],
          stop: threading.Event) -> None:
    """The walk, on the driver's own thread: blocks of files onto ``queue``; rows decided
    without a worker (a path that could not be walked) and each file's size (for the
    progress) onto ``decided``, for the main thread; an error of the walk into ``failed``.
    It ends when ``stop`` is set (the run ended early: the cluster is let go, and a call to
    it then could start another)."""
    import pyarrow as pa
    from ray.util.queue import Full

    chunk: list[tuple[str, int, int]] = []

    def put(block) -> None:
        while not stop.is_set():
            with contextlib.suppress(Full):
                queue.put(block, timeout=1)
                return
        raise _Stopped

    def block() -> None:
        put(pa.table({
            "file": pa.array([os.fsencode(p) for p, _, _ in chunk], pa.binary()),
            "size": pa.array([s for _, s, _ in chunk], pa.int64()),
            "mtime": pa.array([m for _, _, m in chunk], pa.int64())}))
        chunk.clear()

    try:
        for item in items:
            decided.put(item if isinstance(item, dict) else item[1])
            if not isinstance(item, dict):
                chunk.append(item)
                if len(chunk) == BATCH:
                    block()
        if chunk:
            block()
        put(None)
    except _Stopped:
        pass
    except BaseException as exc:  # the main thread raises it
        failed.append(exc)
        with contextlib.suppress(_Stopped):
            put(None)


class _Stopped(Exception):
    pass


def run_on_ray(op: str, items, results, summary, progress, address: str,
               workers: int | None, timeout: float, faults) -> None:
    try:
        ray = _connect(address, workers)
    except ImportError:
        from ..errors import UsageError

        raise UsageError("--ray needs Ray Data: pip install 'ckptkit[ray]'") from None
    stop = threading.Event()
    try:
        from ray.util.queue import Queue

        # First: its worker process starts while this one imports Ray Data (a second).
        queue = Queue(QUEUED, actor_options={"num_cpus": 0})
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="ray.data")  # its tuning hints
        decided: SimpleQueue = SimpleQueue()
        failed: list[BaseException] = []
        walker = threading.Thread(target=_walk, args=(items, queue, decided, failed, stop),
                                  daemon=True, name="ckpt-batch-walk")
        walker.start()

        def take_decided() -> None:
            while not decided.empty():
                item = decided.get()
                if isinstance(item, dict):  # a path that could not be walked: decided here
                    progress.start(0, 1)
                    results.add(item)
                    summary.done += 1
                    progress.update(0, 1)
                    if item["error"] is not None:
                        progress.failed()
                else:
                    progress.start(item, 1)

        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        args = {"op": op, "timeout": timeout, "faults": faults}
        usual, context.target_max_block_size = context.target_max_block_size, BLOCK_BYTES
        dataset = ray.data.read_datasource(
            _walked(queue), num_cpus=0, override_num_blocks=1).map_batches(
            _Stage, fn_constructor_kwargs={"stage": "header", **args}, batch_size=BATCH,
            batch_format="pyarrow", num_cpus=1, zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(
                size=size) if op != "hash" else ray.data.ActorPoolStrategy(
                min_size=1, max_size=size))
        if op == "hash":
            dataset = dataset.map_batches(
                _Stage, fn_constructor_kwargs={"stage": "hash", **args}, batch_size=8,
                batch_format="pyarrow", num_cpus=1,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size))
        context.target_max_block_size = usual  # (the dataset has its own copy)
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            take_decided()
            results.add_table(table)
            summary.done += table.num_rows
            sizes = table.column("size").to_pylist()
            for size_, error in zip(sizes, table.column("error").to_pylist(), strict=True):
                progress.update(size_ or 0, 1)
                if error is not None:
                    progress.failed()
        walker.join()
        take_decided()
        if failed:
            raise failed[0]
    finally:
        stop.set()
        ray.shutdown()
