"""The files of a batch run: folders walked lazily, text and Parquet listings read lazily.

A folder is walked as ``ckpt scan`` walks it (``ops.scan.walk``: every file whatever its
name, symbolic links to folders followed once, a folder that cannot be listed an ``error``
row). A file given is a listing: ``*.parquet`` is read for its ``path`` column (and
``path_bytes`` where set: a results file is a listing of the files it describes), anything
else as text, one path per line (paths relative to the current folder, as ``find`` writes
them). Each path of a listing is walked too (a folder in a listing is scanned whole). Hard
links are files of their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..errors import FormatError, UsageError
from ..formats.sniff import path_problem
from ..ops.scan import ScanResult, walk
from . import rows

SNIFF = 8192  # bytes of a text listing checked for NULs (a model file given by mistake)


def check_sources(sources: list[str]) -> None:
    """Refuses, before any work, a source that does not exist or a listing that is binary."""
    for source in sources:
        if os.path.isdir(source):
            continue
        if not os.path.isfile(source):
            raise UsageError(f"{source} is neither a folder nor a listing file")
        if not source.endswith(".parquet"):
            with open(source, "rb") as f:
                if b"\0" in f.read(SNIFF):
                    raise FormatError("not a listing: a binary file (give folders, or a text "
                                      "or Parquet file of paths, one per line)", source)


def _paths(source: str) -> Iterator[str]:
    if os.path.isdir(source):
        yield source
    elif source.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(source)
            names = set(parquet.schema_arrow.names)
            if "path" not in names:
                raise FormatError("a Parquet listing needs a 'path' column", source)
            columns = ["path"] + (["path_bytes"] if "path_bytes" in names else [])
            for batch in parquet.iter_batches(columns=columns, batch_size=10_000):
                raw = (batch.column("path_bytes").to_pylist() if len(columns) == 2
                       else [None] * batch.num_rows)
                for path, exact in zip(batch.column("path").to_pylist(), raw, strict=True):
                    if exact or path:
                        yield os.fsdecode(exact) if exact else path
        except OSError as exc:
            raise FormatError(f"cannot read this Parquet listing ({exc})", source) from None
    else:
        with open(source, "rb") as f:
            for line in f:
                line = line.rstrip(b"\r\n")
                if line:
                    yield os.fsdecode(line)


def files(sources: list[str]) -> Iterator[tuple[str, int, int] | dict[str, Any]]:
    """``(path, size, mtime_ns)`` of each file to do, or a finished row (a path that could not
    be walked or stat'ed), in listing order, each file once: one walk over every source, so
    that a folder reached twice (through a symbolic link, or named twice) is listed once, and
    a file named twice (by any spelling of its path: ``a/./b``, relative or absolute) once."""
    seen: set[str] = set()
    for item in walk(path for source in sources for path in _paths(source)):
        if isinstance(item, ScanResult):
            yield rows.from_scan(item, None, None)
            continue
        ident = os.path.abspath(item)
        if ident in seen:
            continue
        seen.add(ident)
        try:
            info = os.stat(item)
        except OSError as exc:
            yield rows.error_row(item, None, None, path_problem(item, exc))
            continue
        yield item, info.st_size, info.st_mtime_ns
