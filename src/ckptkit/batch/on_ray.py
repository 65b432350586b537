"""The same run on a Ray cluster, through Ray Data (``pip install ckptkit[ray]``).

The driver walks the whole listing first and hands Ray a dataset of ``(file, size, mtime)``
rows (the path's exact bytes; never the file's content: a 24 GB file must not pass through the
object store), in blocks of ``BATCH`` files. ``map_batches`` runs the header stage on a pool of
actors, and for ``hash`` the full-read stage as a second ``map_batches`` with its own pool, so
the cheap answers are not queued behind the reads. Each actor does its files in one child
process of its own (``pool.Pool`` with one worker): the per-file time limit and the
crash-and-retry-once rules are the local run's, applied inside the task, and a file that hangs
or crashes costs its actor nothing more than a fresh child. An actor that dies (its process
killed, its node lost) is restarted by Ray Data and its batch is run again (Ray Data's
defaults for actors: ``max_restarts=-1``, ``max_task_retries=-1``); the rows of a failed
attempt never reach the driver, which writes each row it receives once (``Results``).

Every node needs ckptkit (the same version) importable by its Ray workers, and the files at
the same paths as the driver sees them (a shared file system).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from . import rows
from .pool import Failure, Pool, Task

BATCH = 100  # files per Ray batch (one actor call)


class _Stage:
    """A Ray Data callable class: one stage over a batch of files, in a child process."""

    def __init__(self, stage: str, op: str, timeout: float, faults: list[tuple[str, str]]):
        self.stage, self.op, self.timeout = stage, op, timeout
        self.pool = Pool(1, faults)

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
    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING,
             "configure_logging": True}
    if address == "local":
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return ray


def run_on_ray(op: str, items, results, summary, progress, address: str,
               workers: int | None, timeout: float, faults) -> None:
    import pyarrow as pa

    try:
        ray = _connect(address, workers)
    except ImportError:
        from ..errors import UsageError

        raise UsageError("--ray needs Ray Data: pip install 'ckptkit[ray]'") from None
    try:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="ray.data")  # its tuning hints
        blocks, chunk = [], []

        def block() -> None:
            blocks.append(pa.table({
                "file": pa.array([os.fsencode(p) for p, _, _ in chunk], pa.binary()),
                "size": pa.array([s for _, s, _ in chunk], pa.int64()),
                "mtime": pa.array([m for _, _, m in chunk], pa.int64())}))
            chunk.clear()

        for item in items:
            if isinstance(item, dict):  # a path that could not be walked: decided here
                progress.start(0, 1)
                results.add(item)
                summary.done += 1
                progress.update(0, 1)
                if item["error"] is not None:
                    progress.failed()
                continue
            progress.start(item[1], 1)
            chunk.append(item)
            if len(chunk) == BATCH:
                block()
        if chunk:
            block()
        if not blocks:
            return
        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        args = {"op": op, "timeout": timeout, "faults": faults}
        dataset = ray.data.from_arrow(blocks).map_batches(
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
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            results.add_table(table)
            summary.done += table.num_rows
            sizes = table.column("size").to_pylist()
            for size_, error in zip(sizes, table.column("error").to_pylist(), strict=True):
                progress.update(size_ or 0, 1)
                if error is not None:
                    progress.failed()
    finally:
        ray.shutdown()
