"""``ckpt library scan``: every model file under some folders, indexed into the database.

A scan first lists the folders (``ops.scan.walk``: every file, links to folders followed
once) and takes each model file's size, modification time, inode and device. A file whose
row has the same four is not read at all. A file not seen at its path before but whose
inode, device, size and modification time a row has is the same file under another name
(a rename or a move within the file system keeps the inode; a copy does not): its row
follows it, or, when the old path still exists (a hard link), is copied. The status-change
time, which ``ops.hashing``'s cache also compares, is not: a rename sets it, so it would
make every move a rehash; a file rewritten in place and given its old modification time
back is the one change a scan does not see (``ckpt hash`` reads the file itself). Only the rest is
read, each in one pass (``ops.model_hash``: every hash and the component digests) after its
header has been judged (``ops.scan``: safe, unsafe, error) and identified; an unsafe pickle
is hashed but never opened as a checkpoint.

Each file's rows are written in one transaction as soon as it is done, so an interrupted
scan keeps what it finished. Rows of files that are gone from the folders scanned are
removed at the end of a scan that walked those folders completely. Files whose rows an
older ckptkit wrote (``index_version``) are read again from their headers, not rehashed.
Sidecar files (``sidecars``) are read again when they appear, change or go.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..arch.detect import Identification
from ..engine.writer import Progress
from ..errors import CkptError
from ..formats import open_checkpoint
from ..formats.checkpoint import paused_gc
from ..formats.sniff import MODEL_EXTENSIONS
from ..ops.hashing import remembered_together
from ..ops.inspect import describe_checkpoint, identify_checkpoint, quantization_label
from ..ops.model_hash import hash_checkpoint, hash_file
from ..ops.scan import SAFE, ScanResult, scan_file, walk
from ..safe_text import json_dumps, printable
from . import metadata as meta
from . import sidecars
from .db import transaction

INDEX_VERSION = 1  # what the code that fills a row reads; rows below it are read again


@dataclass
class ScanStats:
    """What a scan did; ``hashed`` counts the files read whole (the slow part)."""

    files: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    linked: int = 0
    removed: int = 0
    refreshed: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    sidecars_updated: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    problems: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["verdicts"] = dict(self.verdicts)
        return out


@dataclass
class _Seen:
    path: str
    stat: tuple[int, int, int, int]  # size, mtime_ns, inode, device
    folder: str
    listing: set[str]


class _OneBar:
    """Hands each file's reading to the scan's one bar, whose totals are set in advance."""

    def __init__(self, bar: Progress):
        self.bar = bar

    def start(self, total_bytes: int, total_items: int) -> None:
        pass

    def update(self, nbytes: int, items: int = 0) -> None:
        self.bar.update(nbytes, items)


def scan_library(conn: sqlite3.Connection, paths: Iterable[str],
                 progress: Progress | None = None,
                 on_file: Callable[[str, str], None] | None = None) -> ScanStats:
    """Indexes the model files under ``paths`` (see the module's docstring); ``on_file``
    hears ``(path, what was done)`` for each file read or moved."""
    started = time.monotonic()
    stats = ScanStats()
    roots = [os.path.abspath(p) for p in paths]
    seen, incomplete = _list(roots, stats)
    rows = {r["path"]: r for r in conn.execute(
        "SELECT id, path, size, mtime_ns, inode, device, index_version FROM files")}
    by_inode: dict[tuple, list[sqlite3.Row]] = defaultdict(list)
    for r in rows.values():
        by_inode[(r["size"], r["mtime_ns"], r["inode"], r["device"])].append(r)
    stored_sidecars: dict[int, dict[bytes, int]] = defaultdict(dict)
    for s in conn.execute("SELECT file_id, path, mtime_ns FROM sidecars"):
        stored_sidecars[s["file_id"]][s["path"]] = s["mtime_ns"]
    present = {os.fsencode(s.path) for s in seen}
    moved: set[int] = set()
    to_read = []
    for item in seen:
        key = os.fsencode(item.path)
        row = rows.get(key)
        stats.files += 1
        if row is not None and _same(row, item.stat):
            stats.unchanged += 1
            if row["index_version"] < INDEX_VERSION:
                _refresh(conn, row["id"], item, stats)
            elif _sidecars_changed(item, stored_sidecars.get(row["id"], {})):
                with transaction(conn):
                    _write_sidecars(conn, row["id"], item)
                stats.sidecars_updated += 1
            continue
        same_file = [r for r in by_inode.get(item.stat, ()) if r["path"] != key]
        if row is None and same_file:
            gone = [r for r in same_file if r["path"] not in present and r["id"] not in moved
                    and not os.path.lexists(os.fsdecode(r["path"]))]
            if gone:
                _moved(conn, gone[0]["id"], item)
                moved.add(gone[0]["id"])  # a second new name for it is a link to this one
                stats.moved += 1
                what = "moved"
            else:
                _linked(conn, same_file[0]["id"], item)
                stats.linked += 1
                what = "linked"
            if on_file:
                on_file(item.path, what)
            continue
        to_read.append((item, row))
    if progress:
        progress.start(sum(i.stat[0] for i, _ in to_read), len(to_read))
    shared = _OneBar(progress) if progress else None
    with remembered_together():
        for item, row in to_read:
            done = _index(conn, item, row, shared, stats)
            if on_file and done:
                on_file(item.path, done)
    stats.removed = _remove_gone(conn, roots, present, incomplete)
    stats.seconds = time.monotonic() - started
    return stats


def _list(roots: list[str], stats: ScanStats) -> tuple[list[_Seen], list[str]]:
    """The model files under ``roots`` with their stat, and the folders that could not be
    listed completely (their rows are kept)."""
    files: list[str] = []
    incomplete: list[str] = []
    for item in walk(roots):
        if isinstance(item, ScanResult):
            if item.verdict != "skipped":
                incomplete.append(os.path.abspath(item.path))
                stats.problems.append({"path": printable(item.path),
                                       "problem": item.reasons[0]["message"]})
            continue
        files.append(os.path.abspath(item))
    listings: dict[str, set[str]] = defaultdict(set)
    for path in files:
        folder, name = os.path.split(path)
        listings[folder].add(name)
    seen = []
    for path in files:
        if os.path.splitext(path)[1].lower() not in MODEL_EXTENSIONS:
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            stats.problems.append({"path": printable(path),
                                   "problem": exc.strerror or str(exc)})
            continue
        folder = os.path.dirname(path)
        seen.append(_Seen(path, (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev), folder,
                          listings[folder]))
    return seen, incomplete


def _same(row: sqlite3.Row, stat: tuple[int, int, int, int]) -> bool:
    return (row["size"], row["mtime_ns"], row["inode"], row["device"]) == stat


def _names(path: str) -> dict[str, Any]:
    return {"path": os.fsencode(path), "display": printable(path),
            "name": printable(os.path.basename(path))}


def _taken(conn: sqlite3.Connection, item: _Seen) -> bool:
    """Whether another scan running at the same time has indexed ``item`` already."""
    return conn.execute("SELECT 1 FROM files WHERE path = ?",
                        (os.fsencode(item.path),)).fetchone() is not None


def _moved(conn: sqlite3.Connection, file_id: int, item: _Seen) -> None:
    with transaction(conn):
        if _taken(conn, item):
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return
        conn.execute("UPDATE files SET path = :path, display = :display, name = :name "
                     "WHERE id = :id", {**_names(item.path), "id": file_id})
        _write_sidecars(conn, file_id, item)


def _linked(conn: sqlite3.Connection, file_id: int, item: _Seen) -> None:
    """A new row for another name of an indexed file (a hard link): its rows, copied."""
    with transaction(conn):
        if _taken(conn, item):
            return
        row = dict(conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())
        row.update(_names(item.path))
        del row["id"]
        columns = ", ".join(row)
        new_id = conn.execute(f"INSERT INTO files ({columns}) VALUES "
                              f"({', '.join(':' + k for k in row)})", row).lastrowid
        conn.execute("INSERT INTO components SELECT ?, name, digest, tensors, bytes FROM "
                     "components WHERE file_id = ?", (new_id, file_id))
        conn.execute("INSERT INTO ancestry SELECT ?, seq, parent_seq, relation, name, "
                     "hash_kind, hash, source, detail FROM ancestry WHERE file_id = ?",
                     (new_id, file_id))
        _write_sidecars(conn, new_id, item)


def _sidecars_changed(item: _Seen, stored: dict[bytes, int]) -> bool:
    found = sidecars.find(item.folder, os.path.basename(item.path), item.listing)
    if {os.fsencode(p) for p, _ in found} != set(stored):
        return True
    for path, _ in found:
        try:
            if os.stat(path).st_mtime_ns != stored[os.fsencode(path)]:
                return True
        except OSError:
            return True
    return False


def _write_sidecars(conn: sqlite3.Connection, file_id: int, item: _Seen) -> dict[str, Any]:
    """Replaces the file's sidecar rows with those found now; what they say, merged (the
    first sidecar to say a thing wins, in ``sidecars.candidates`` order)."""
    conn.execute("DELETE FROM sidecars WHERE file_id = ?", (file_id,))
    said: dict[str, Any] = {}
    for path, kind in sidecars.find(item.folder, os.path.basename(item.path), item.listing):
        try:
            st = os.stat(path)
        except OSError:
            continue
        content = None if kind == "preview" else sidecars.read(path)
        for k, v in sidecars.described(kind, content).items():
            said.setdefault(k, v)
        conn.execute("INSERT OR REPLACE INTO sidecars VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (file_id, kind, os.fsencode(path), printable(path), st.st_size,
                      st.st_mtime_ns, None if content is None else json_dumps(content)))
    for key in ("title", "base_model"):
        if key in said:
            conn.execute(f"UPDATE files SET {key} = ? WHERE id = ?", (str(said[key]), file_id))
    return said


def _index(conn: sqlite3.Connection, item: _Seen, row: sqlite3.Row | None,
           progress: Progress | None, stats: ScanStats) -> str | None:
    """Reads, hashes and writes one file; what was done, or None if it could not be."""
    try:
        record = _read(item.path, progress)
    except (CkptError, OSError) as exc:
        reason = exc.reason if isinstance(exc, CkptError) else exc.strerror or str(exc)
        stats.problems.append({"path": printable(item.path), "problem": reason})
        return None
    stats.hashed += 1
    stats.hashed_bytes += item.stat[0]
    stats.verdicts[record["row"]["verdict"]] += 1
    with transaction(conn):
        # by path: a scan running at the same time may have indexed it meanwhile
        conn.execute("DELETE FROM files WHERE path = ?", (os.fsencode(item.path),))
        values = {**record["row"], **_names(item.path),
                  **dict(zip(("size", "mtime_ns", "inode", "device"), item.stat, strict=True)),
                  "hashed_at": time.time(), "indexed_at": time.time(),
                  "index_version": INDEX_VERSION}
        file_id = conn.execute(
            f"INSERT INTO files ({', '.join(values)}) VALUES "
            f"({', '.join(':' + k for k in values)})", values).lastrowid
        conn.executemany("INSERT INTO components VALUES (?, ?, ?, ?, ?)",
                         [(file_id, *c) for c in record["components"]])
        _write_ancestry(conn, file_id, record["ancestry"])
        _write_sidecars(conn, file_id, item)
    if row is None:
        stats.new += 1
        return "new"
    stats.changed += 1
    return "changed"


def _read(path: str, progress: Progress | None) -> dict[str, Any]:
    """Everything the library keeps of one file: its row's columns, components, ancestry."""
    verdict = scan_file(path)
    row: dict[str, Any] = {"verdict": verdict.verdict, "format": verdict.format,
                           "reasons": json_dumps(verdict.reasons)}
    if verdict.verdict != SAFE:
        hashed = hash_file(path, digests=False, progress=progress)
        row.update({k: hashed[k] for k in ("sha256", "autov1", "autov2", "autov3", "crc32",
                                           "blake3")})
        row["notes"] = json_dumps([f"not opened: the scan says {verdict.verdict}"])
        return {"row": row, "components": [], "ancestry": []}
    with open_checkpoint(path) as checkpoint:
        ident = identify_checkpoint(checkpoint)
        hashed = hash_checkpoint(checkpoint, ident, progress=progress)
        header = _header(checkpoint, identify_checkpoint(checkpoint, hashed["sha256"]))
    row.update(header["row"])
    row.update({k: hashed[k] for k in ("sha256", "autov1", "autov2", "autov3", "crc32",
                                       "blake3")})
    row["notes"] = json_dumps(hashed["notes"])
    components = [(name, digest, hashed["component_sizes"][name]["tensors"],
                   hashed["component_sizes"][name]["bytes"])
                  for name, digest in hashed["components"].items()]
    return {"row": row, "components": components, "ancestry": header["ancestry"]}


def _header(checkpoint, ident: Identification) -> dict[str, Any]:
    """The columns that come from a file's header: what it is, its metadata, its parents."""
    with paused_gc():
        report = describe_checkpoint(checkpoint)
    decoded = report["metadata"]
    dtypes = report["dtypes"]
    dtype = next(iter(dtypes), None)
    raw = dict(checkpoint.metadata)
    row = {"kind": ident.kind, "family": ident.family or
           (",".join(ident.compatible_families) or None),
           "variants": json.dumps(ident.variants), "layout": ident.layout, "dtype": dtype,
           "quantization": quantization_label(report, ident.extra),
           "tensors": report["tensor_count"], "parameters": report["parameter_count"],
           "identification": json_dumps(ident.to_dict()), "metadata": json_dumps(decoded),
           "title": meta.title(raw), "base_model": meta.base_model(raw) or ident.family}
    return {"row": row, "ancestry": meta.ancestry(raw)}


def _write_ancestry(conn: sqlite3.Connection, file_id: int, entries: list[dict]) -> None:
    conn.execute("DELETE FROM ancestry WHERE file_id = ?", (file_id,))
    conn.executemany(
        "INSERT INTO ancestry VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(file_id, i, e["parent"], e["relation"], e["name"] and printable(e["name"]),
          e["hash_kind"], e["hash"], e["source"], json_dumps(e["detail"]))
         for i, e in enumerate(entries)])


def _refresh(conn: sqlite3.Connection, file_id: int, item: _Seen, stats: ScanStats) -> None:
    """A row an older ckptkit wrote, read again from the file's header (hashes kept)."""
    verdict = scan_file(item.path)
    values: dict[str, Any] = {"verdict": verdict.verdict, "format": verdict.format,
                              "reasons": json_dumps(verdict.reasons)}
    ancestry: list[dict] = []
    if verdict.verdict == SAFE:
        try:
            with open_checkpoint(item.path) as checkpoint:
                sha = conn.execute("SELECT sha256 FROM files WHERE id = ?",
                                   (file_id,)).fetchone()[0]
                header = _header(checkpoint, identify_checkpoint(checkpoint, sha))
        except (CkptError, OSError):
            return
        values.update(header["row"])
        ancestry = header["ancestry"]
    values.update(indexed_at=time.time(), index_version=INDEX_VERSION, id=file_id)
    with transaction(conn):
        conn.execute(f"UPDATE files SET {', '.join(f'{k} = :{k}' for k in values)} "
                     "WHERE id = :id", values)
        _write_ancestry(conn, file_id, ancestry)
        _write_sidecars(conn, file_id, item)
    stats.refreshed += 1


def _remove_gone(conn: sqlite3.Connection, roots: list[str], present: set[bytes],
                 incomplete: list[str]) -> int:
    """Deletes the rows of files under ``roots`` that are no longer there (but under a
    folder that could not be listed); how many."""
    def under(path: str, folders: list[str]) -> bool:
        return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)

    gone = []
    for r in conn.execute("SELECT id, path FROM files"):
        path = os.fsdecode(r["path"])
        if r["path"] not in present and under(path, roots) and not under(path, incomplete) \
                and not os.path.exists(path):
            gone.append(r["id"])
    if gone:
        with transaction(conn):
            conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in gone])
    return len(gone)
