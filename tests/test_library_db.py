"""The library database: a corrupt, locked or newer database is one line and an exit code,
never a traceback; a database of the older schema is migrated, its rows kept."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from helpers import run_cli
from safetensors.torch import save_file

from ckptkit.library import db as library_db
from ckptkit.library.db import MIGRATIONS, SCHEMA_VERSION, open_library
from ckptkit.ops.model_hash import hash_file


def _one_line_error(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("ckpt: error: ") and "Traceback" not in err


@pytest.mark.parametrize("command", [("list",), ("dupes",), ("scan", "."), ("find", "abc")])
def test_corrupt_database(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "lib.sqlite"
    bad.write_bytes(b"this is not a database" * 400)
    code, _, err = run_cli(capsys, "library", *command, "--db", bad)
    assert code == 3
    _one_line_error(err)
    assert "not a readable ckptkit library" in err


def test_truncated_database(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(3)}, str(folder / "a.safetensors"))
    db = tmp_path / "lib.sqlite"
    assert run_cli(capsys, "library", "scan", "--quiet", "--db", db, folder)[0] == 0
    data = db.read_bytes()
    db.write_bytes(data[:len(data) // 2] + b"\0" * 100)
    for name in ("lib.sqlite-wal", "lib.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    code, _, err = run_cli(capsys, "library", "list", "--db", db)
    assert code == 3
    _one_line_error(err)


def test_locked_database(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(3)}, str(folder / "a.safetensors"))
    db = tmp_path / "lib.sqlite"
    open_library(str(db)).close()
    monkeypatch.setattr(library_db, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program writing for a long time
    try:
        code, _, err = run_cli(capsys, "library", "scan", "--db", db, folder)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 5
    _one_line_error(err)
    assert "locked" in err
    assert run_cli(capsys, "library", "scan", "--quiet", "--db", db, folder)[0] == 0


def test_newer_database_is_refused(tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    open_library(str(db)).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    code, _, err = run_cli(capsys, "library", "list", "--db", db)
    assert code == 3 and "newer ckptkit" in err
    _one_line_error(err)


def test_migration_from_version_1(tmp_path, capsys):
    """A database written by the first schema (no lineage table, no base model): opened, it
    is migrated; its rows are kept and read again from the headers, not rehashed."""
    folder = tmp_path / "m"
    folder.mkdir()
    base = folder / "base.safetensors"
    save_file({"a": torch.ones(3)}, str(base))
    lora = folder / "lora.safetensors"
    base_sha = hash_file(str(base))["sha256"]
    save_file({"b": torch.ones(2)}, str(lora),
              metadata={"ss_new_sd_model_hash": base_sha, "ss_sd_model_name": "base.ckpt",
                        "ss_base_model_version": "sd_v1"})
    db = tmp_path / "lib.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in library_db._statements(MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for path in (base, lora):
        st = path.stat()
        found = hash_file(str(path))
        conn.execute("INSERT INTO files (path, display, name, size, mtime_ns, inode, device, "
                     "sha256, verdict, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'safe', 'unknown')",
                     (str(path).encode(), str(path), path.name, st.st_size, st.st_mtime_ns,
                      st.st_ino, st.st_dev, found["sha256"]))
    conn.close()

    code, out, err = run_cli(capsys, "library", "scan", "--json", "--db", db, folder)
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["hashed"], stats["refreshed"], stats["unchanged"]) == (0, 2, 2)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    code, out, _ = run_cli(capsys, "library", "lineage", "--json", "--db", db, lora)
    (parent,) = json.loads(out)["parents"]
    assert parent["relation"] == "base-model"
    assert [f["name"] for f in parent["files"]] == ["base.safetensors"]
    code, out, _ = run_cli(capsys, "library", "list", "--json", "--db", db, "--base", "sd_v1")
    assert [m["name"] for m in json.loads(out)] == ["lora.safetensors"]
