"""The results file: rows written as the run goes, resumed, and finished sorted by path.

Rows go to ``RESULTS.parts/part-NNNNNN.parquet``, each part a complete Parquet file written
beside its name and renamed into place, every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``: a run
killed at any moment leaves only whole parts, and loses at most the rows of the part it was
filling. An interrupted run (Ctrl-C) writes its pending rows first. Each part is sorted by
the exact bytes of its paths when written.

``finish`` merges the parts (and, when resuming, the RESULTS of an earlier finished run,
sorted too) as sorted runs, ``FAN_IN`` at a time (more parts than that are merged in rounds,
into runs beside them), reading ``READ_ROWS`` rows of each at a time: it keeps the newest
row of each file, drops rows of files the listing no longer names, writes RESULTS atomically
(a temporary file renamed) in row groups of ``ROW_GROUP`` rows, and removes the parts. Its
memory is bounded by those constants (a few tens of MB), whatever the number of files; an
earlier version sorted every row in memory (about 300 bytes a file: 300 MB for 1M files).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine.atomic import check_output_path
from ..errors import FormatError, UsageError
from . import rows

FLUSH_ROWS = 1000
FLUSH_SECONDS = 10.0
FAN_IN = 32  # sorted runs merged at once
READ_ROWS = 1024  # rows read from each run at a time
ROW_GROUP = 50_000  # rows per row group of RESULTS


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
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self._flushed = time.monotonic()
        if not self._pending:
            return
        tables = self._tables + ([rows.table(self._rows)] if self._rows else [])
        table = pa.concat_tables(tables)
        table = table.take(pc.sort_indices(_keys(table)))  # stable: a file's rows in order
        name = os.path.join(self.parts, f"part-{self._next:06d}.parquet")
        pq.write_table(table, name + ".tmp")
        os.replace(name + ".tmp", name)
        self._next += 1
        self.written += table.num_rows
        self._rows, self._tables, self._pending = [], [], 0

    def finish(self, listed: set[bytes] | None) -> Counts:
        """RESULTS written (see the module's docstring); returns what it holds, and how many
        files got more than one row from the parts (0 unless a file changed between an
        interrupted run and its resumption)."""
        self.flush()
        counts = Counts()
        runs = [os.path.join(self.parts, n) for n in self._part_names()]
        level = 0
        while len(runs) > FAN_IN - 1:  # leaves room for an earlier RESULTS in the last merge
            level += 1
            merged = []
            for i in range(0, len(runs), FAN_IN):
                name = os.path.join(self.parts, f"merge-{level}-{i // FAN_IN:06d}.parquet")
                with _Output(name, None) as out:
                    counts.duplicates += _merge(runs[i:i + FAN_IN], out, None, False)
                if level > 1:
                    for run in runs[i:i + FAN_IN]:
                        os.unlink(run)
                merged.append(name)
            runs = merged
        earlier = self.resume and os.path.isfile(self.target)
        tmp = self.target + ".tmp"
        with _Output(tmp, counts) as out:
            counts.duplicates += _merge(([self.target] if earlier else []) + runs, out,
                                        listed, earlier)
        os.replace(tmp, self.target)
        shutil.rmtree(self.parts)
        return counts


@dataclass
class Counts:
    """What RESULTS holds, counted as it is written."""

    rows: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # rows with an error
    internal: bool = False  # a finding of kind "internal" (ckptkit failed on a file)
    duplicates: int = 0

    def add(self, table) -> None:
        import pyarrow.compute as pc

        self.rows += table.num_rows
        for v in pc.value_counts(table.column("verdict")).to_pylist():
            self.verdicts[v["values"]] = self.verdicts.get(v["values"], 0) + v["counts"]
        self.errors += table.num_rows - table.column("error").null_count
        kinds = pc.struct_field(pc.list_flatten(table.column("findings")), "kind")
        self.internal = self.internal or bool(pc.any(pc.equal(kinds, "internal")).as_py())


class _Output:
    """A Parquet file written in row groups of ``ROW_GROUP`` rows (fewer held at once)."""

    def __init__(self, path: str, counts: Counts | None):
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(path, rows.schema())
        self.counts = counts
        self.held: list[Any] = []
        self.rows = 0

    def write(self, table) -> None:
        self.held.append(table)
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.held:
            table = pa.concat_tables(self.held)
            self.writer.write_table(table, row_group_size=ROW_GROUP)
            if self.counts is not None:
                self.counts.add(table)
        self.held, self.rows = [], 0

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._flush()
        self.writer.close()


def _keys(table):
    """Each row's file as exact bytes (``row_key``), as an Arrow array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pc.is_null(table.column("path_bytes")),
                      pc.cast(table.column("path"), pa.binary()), table.column("path_bytes"))


def _batches(path: str) -> Iterator[Any]:
    """The rows of a sorted run, ``READ_ROWS`` at a time, each with its ``_key``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
            if batch.num_rows:
                table = pa.Table.from_batches([batch]).cast(rows.schema())
                yield table.append_column("_key", _keys(table))
    except (OSError, pa.ArrowInvalid) as exc:
        raise FormatError(f"cannot read these results ({exc})", path) from None


def _merge(sources: list[str], out: _Output, listed: set[bytes] | None,
           earlier: bool) -> int:
    """Merges sorted runs, oldest first, into ``out``: the newest row of each file (of the
    latest run holding it, the last in it), of files in ``listed`` (unless None). Returns how
    many rows were dropped as older rows of a file, not counting those of an earlier RESULTS
    (``sources[0]`` when ``earlier``), which a resumed run is expected to redo. A run holds a
    file once (a part: one run's rows; a merged run: de-duplicated).

    In steps: every row up to the smallest of the runs' last keys in hand is in hand, so
    those rows are sorted and written, and the run that ran out is read on."""
    import pyarrow as pa
    import pyarrow.compute as pc

    readers = [_batches(s) for s in sources]
    held: list[Any] = [next(r, None) for r in readers]
    seen = [0] * len(sources)  # rows of each run taken so far: the order within a run
    dropped = 0
    while True:
        live = [i for i, t in enumerate(held) if t is not None]
        if not live:
            return dropped
        bound = min(held[i].column("_key")[-1].as_py() for i in live)
        pieces = []
        for i in live:
            table = held[i]
            n = pc.sum(pc.less_equal(table.column("_key"), bound)).as_py() or 0
            if n:
                piece = table.slice(0, n)
                pieces.append(piece.append_column("_run", pa.array([i] * n, pa.int32()))
                              .append_column("_seq", pa.array(range(seen[i], seen[i] + n),
                                                              pa.int64())))
                seen[i] += n
            held[i] = table.slice(n) if n < table.num_rows else next(readers[i], None)
        step = pa.concat_tables(pieces).sort_by(
            [("_key", "ascending"), ("_run", "descending"), ("_seq", "descending")])
        keys = step.column("_key").combine_chunks()
        first = pa.concat_arrays([pa.array([True]), pc.not_equal(keys.slice(1),
                                                                 keys.slice(0, len(keys) - 1))])
        older = pc.invert(first)
        if earlier:
            older = pc.and_(older, pc.not_equal(step.column("_run"), 0))
        dropped += pc.sum(older.cast(pa.int64())).as_py() or 0
        step = step.filter(first)
        if listed is not None:
            step = step.filter(pa.array([k in listed for k in step.column("_key").to_pylist()]))
        out.write(step.drop_columns(["_key", "_run", "_seq"]))
