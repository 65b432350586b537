"""The results file: rows written as the run goes, resumed, and finished sorted by path.

Rows go to ``RESULTS.parts/part-NNNNNN.parquet``, each part a complete Parquet file written
beside its name and renamed into place, every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``: a run
killed at any moment leaves only whole parts, and loses at most the rows of the part it was
filling. An interrupted run (Ctrl-C) writes its pending rows first. ``finish`` reads the
parts (and, when resuming, the RESULTS of an earlier finished run), keeps the newest row of
each file (by the exact bytes of its path), drops rows of files the listing no longer names,
sorts them by path, writes RESULTS atomically (a temporary file renamed) and removes the
parts. Finishing holds the rows in memory: about 300 bytes a file (1M files, 300 MB).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from ..engine.atomic import check_output_path
from ..errors import FormatError, UsageError
from . import rows

FLUSH_ROWS = 1000
FLUSH_SECONDS = 10.0


def row_key(row: dict[str, Any]) -> bytes:
    """A row's file as exact bytes (the key that resume and de-duplication match on)."""
    return row["path_bytes"] or row["path"].encode()


class Results:
    def __init__(self, target: str, resume: bool, flush_rows: int = FLUSH_ROWS):
        check_output_path(target)
        self.flush_rows = flush_rows
        self.target = target
        self.parts = target + ".parts"
        self.resume = resume
        if os.path.isdir(self.parts) and not resume:
            raise UsageError(f"{self.parts} holds the rows of an interrupted run: add --resume "
                             "to finish it, or delete that folder to start again")
        os.makedirs(self.parts, exist_ok=True)
        self._next = 1 + max((int(name[5:11]) for name in self._part_names()), default=0)
        self._rows: list[dict[str, Any]] = []
        self._tables: list[Any] = []
        self._pending = 0
        self._flushed = time.monotonic()
        self.written = 0

    def _part_names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.parts)
                      if n.startswith("part-") and n.endswith(".parquet") and n[5:11].isdigit())

    def previous(self) -> dict[bytes, tuple[int | None, int | None]]:
        """Files already done (by an earlier run, finished or not): their size and mtime."""
        import pyarrow.parquet as pq

        done: dict[bytes, tuple[int | None, int | None]] = {}
        sources = [self.target] if os.path.isfile(self.target) else []
        sources += [os.path.join(self.parts, n) for n in self._part_names()]
        for source in sources:
            try:
                table = pq.read_table(source, columns=["path", "path_bytes", "size", "mtime"])
            except Exception as exc:
                raise FormatError(f"cannot resume from it: not a results file ({exc})",
                                  source) from None
            mtimes = table.column("mtime").cast("int64").to_pylist()
            for path, raw, size, mtime in zip(table.column("path").to_pylist(),
                                              table.column("path_bytes").to_pylist(),
                                              table.column("size").to_pylist(), mtimes,
                                              strict=True):
                done[raw or path.encode()] = (size, mtime)
        return done

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self._added(1)

    def add_table(self, table) -> None:
        self._tables.append(table)
        self._added(table.num_rows)

    def _added(self, n: int) -> None:
        self._pending += n
        if self._pending >= self.flush_rows or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flushed = time.monotonic()
        if not self._pending:
            return
        tables = self._tables + ([rows.table(self._rows)] if self._rows else [])
        table = pa.concat_tables(tables)
        name = os.path.join(self.parts, f"part-{self._next:06d}.parquet")
        pq.write_table(table, name + ".tmp")
        os.replace(name + ".tmp", name)
        self._next += 1
        self.written += table.num_rows
        self._rows, self._tables, self._pending = [], [], 0

    def finish(self, listed: set[bytes] | None):
        """RESULTS written (see the module's docstring); returns the final table and the
        number of files that got more than one row from the parts (0 unless a file changed
        between an interrupted run and its resumption)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.flush()
        parts = [pq.read_table(os.path.join(self.parts, n), schema=rows.schema())
                 for n in self._part_names()]
        earlier = ([pq.read_table(self.target, schema=rows.schema())]
                   if self.resume and os.path.isfile(self.target) else [])
        table = pa.concat_tables(earlier + parts) if earlier + parts else rows.table([])
        key = pc.if_else(pc.is_null(table.column("path_bytes")),
                         pc.cast(table.column("path"), pa.binary()), table.column("path_bytes"))
        in_parts = key.slice(table.num_rows - sum(p.num_rows for p in parts))
        duplicates = len(in_parts) - len(pc.unique(in_parts))
        table = table.append_column("_key", key).append_column(
            "_seq", pa.array(range(table.num_rows), pa.int64()))
        if listed is not None:
            table = table.filter(pc.is_in(table.column("_key"),
                                          value_set=pa.array(list(listed), pa.binary())))
        table = table.sort_by([("_key", "ascending"), ("_seq", "descending")])
        if table.num_rows:  # the newest row of each file: the first of its run of keys
            keys = table.column("_key").combine_chunks()
            newest = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
            table = table.filter(pa.concat_arrays([pa.array([True]), newest]))
        table = table.drop_columns(["_key", "_seq"])
        tmp = self.target + ".tmp"
        pq.write_table(table, tmp, row_group_size=50_000)
        os.replace(tmp, self.target)
        shutil.rmtree(self.parts)
        return table, duplicates
