"""The library's SQLite database: where it is, its schema, and how it is opened safely.

The schema has a version (SQLite's ``user_version``); ``MIGRATIONS`` lists the steps from
each version to the next, and opening a database runs the steps it lacks, in one
transaction each, so that a database made by an older ckptkit is brought up to date and one
made by a newer ckptkit is refused rather than misread. A fresh database runs every step.

Several scans may run at once (two terminals, a web page reading while a scan writes): the
database is in WAL mode (readers never wait for the writer), each file's rows are written in
one short ``BEGIN IMMEDIATE`` transaction, and a writer waits up to ``BUSY_TIMEOUT_S`` for
another before giving up. Every failure of the database itself (not a database, corrupt,
locked for too long, read-only) becomes one ``CkptError`` sentence with its exit code
(``database_errors``): 3 when it cannot be read, 5 when it cannot be written.

Paths are stored as their bytes (``path``: a file name need not be UTF-8, and SQLite text
must be) with a printable copy for people (``display``, ``name``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator

from ..errors import CkptError, FormatError, OutputError, UsageError
from ..ops.hashing import cache_dir

BUSY_TIMEOUT_S = 30.0

_V1 = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,      -- os.fsencode(absolute path)
    display TEXT NOT NULL,          -- the path, printable
    name TEXT NOT NULL,             -- the file name, printable
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    device INTEGER NOT NULL,
    sha256 TEXT, autov1 TEXT, autov2 TEXT, autov3 TEXT, crc32 TEXT, blake3 TEXT,
    format TEXT,                    -- safetensors, torch-zip, pickle, gguf, ... (null: unread)
    verdict TEXT NOT NULL,          -- safe, unsafe, error (ckpt scan's)
    reasons TEXT NOT NULL DEFAULT '[]',       -- JSON: the scan's reasons
    kind TEXT, family TEXT, variants TEXT NOT NULL DEFAULT '[]', layout TEXT,
    dtype TEXT,                     -- the dtype of most parameters
    quantization TEXT,              -- fp8, scaled-fp8, ... (null: none)
    tensors INTEGER, parameters INTEGER,
    title TEXT,                     -- ModelSpec's title, or the Civitai name from a sidecar
    identification TEXT,            -- JSON: ckpt inspect's identification
    metadata TEXT NOT NULL DEFAULT '{}',      -- JSON: the header metadata, decoded
    notes TEXT NOT NULL DEFAULT '[]',         -- JSON: what could not be indexed, and why
    hashed_at REAL, indexed_at REAL
);
CREATE INDEX files_sha256 ON files(sha256);
CREATE INDEX files_autov1 ON files(autov1);
CREATE INDEX files_autov3 ON files(autov3);
CREATE INDEX files_blake3 ON files(blake3);
CREATE INDEX files_inode ON files(device, inode);
CREATE INDEX files_kind ON files(kind, family);
CREATE TABLE components (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    name TEXT NOT NULL,             -- diffusion_model, clip_l, clip_g, t5xxl, vae, lora, ...
    digest TEXT NOT NULL,           -- ops.model_hash's content digest
    tensors INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (file_id, name)
);
CREATE INDEX components_digest ON components(digest);
CREATE TABLE sidecars (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,             -- civitai-info, cm-info, metadata-json, a1111-json, preview
    path BLOB NOT NULL,
    display TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content TEXT,                   -- JSON as read (null for a preview image)
    PRIMARY KEY (file_id, path)
);
"""

# Version 2: lineage. Every parent a file's metadata names (merge inputs, a LoRA's base
# model, the sources of a split or a bake), and a base model column to filter on. Files
# indexed before are read again from their headers on the next scan (index_version 0), not
# rehashed.
_V2 = """
ALTER TABLE files ADD COLUMN base_model TEXT;
ALTER TABLE files ADD COLUMN index_version INTEGER NOT NULL DEFAULT 0;
CREATE TABLE ancestry (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,           -- order within the file
    parent_seq INTEGER,             -- the entry this one is a parent of (null: of the file)
    relation TEXT NOT NULL,         -- merge, base-model, source, lora
    name TEXT,                      -- the file name the metadata gives
    hash_kind TEXT,                 -- sha256, autov1, autov2, autov3
    hash TEXT,
    source TEXT NOT NULL,           -- the metadata key it comes from
    detail TEXT NOT NULL DEFAULT '{}',        -- JSON: method, weight, strength...
    PRIMARY KEY (file_id, seq)
);
CREATE INDEX ancestry_hash ON ancestry(hash);
CREATE INDEX files_base ON files(base_model);
"""

MIGRATIONS = (_V1, _V2)  # MIGRATIONS[i] takes a database from version i to version i + 1
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> str:
    """``library.sqlite`` in ckptkit's cache folder (``ops.hashing.cache_dir``)."""
    return os.path.join(cache_dir(), "library.sqlite")


@contextlib.contextmanager
def database_errors(path: str, writing: bool = False) -> Iterator[None]:
    """Turns a failure of the database ``path`` into one ``CkptError`` sentence: 3 (cannot be
    read: not a database, corrupt), or 5 when ``writing`` and it cannot be written (locked
    by another writer for longer than the timeout, read-only, disk full)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _error(path, exc, writing) from None


def _error(path: str, exc: sqlite3.Error, writing: bool) -> CkptError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        why = (f"the library database is locked by another program (waited "
               f"{BUSY_TIMEOUT_S:.0f} s); try again when it is done")
        return (OutputError if writing else FormatError)(why, path)
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return FormatError(f"is not a readable ckptkit library ({text}); move it aside and "
                           "scan again to rebuild it", path)
    if writing or "readonly" in text or "read-only" in text:
        return OutputError(f"the library database cannot be written ({text})", path)
    return FormatError(f"the library database cannot be read ({text})", path)


def open_library(path: str | None = None, *, create: bool = True) -> sqlite3.Connection:
    """The library database at ``path`` (default: ``default_path``), migrated to
    ``SCHEMA_VERSION``; created (with its folder) when ``create``, else a missing database
    is a usage error. Rows come back as ``sqlite3.Row``. The connection is in autocommit
    mode: writers use ``transaction``."""
    path = path or default_path()
    if not os.path.exists(path):
        if not create:
            raise UsageError("no library database here; index some folders first with "
                             "ckpt library scan DIR", path)
        with database_errors(path, writing=True):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create its folder ({exc.strerror})", path) from None
    elif os.path.isdir(path):
        raise UsageError("is a folder; --db takes the database file", path)
    with database_errors(path, writing=create):
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, path)
        except BaseException:
            conn.close()
            raise
    return conn


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise FormatError(f"was made by a newer ckptkit (schema version {version}; this one "
                          f"reads up to {SCHEMA_VERSION}); update ckptkit", path)
    if version == SCHEMA_VERSION:
        return
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once, when created
    for step in range(version, SCHEMA_VERSION):
        with transaction(conn):
            # another process may have migrated it while this one waited for the lock
            if conn.execute("PRAGMA user_version").fetchone()[0] != step:
                continue
            for statement in _statements(MIGRATIONS[step]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step + 1}")


def _statements(script: str) -> list[str]:
    """A migration's statements (``executescript`` would commit the open transaction)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``: a second writer waits for
    the lock here rather than failing half-way), committed on success, rolled back else."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
