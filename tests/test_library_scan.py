"""``ckpt library scan``: what a second scan reads again (counted through its ``--json``
stats), moves, hard links, removals, interrupts, sidecars, and two scans at once."""

from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest
import torch
from helpers import run_cli
from safetensors.torch import save_file

from ckptkit.library import index, queries
from ckptkit.library.db import open_library
from ckptkit.ops.sample import sample


def _scan(capsys, db, *folders) -> dict:
    code, out, err = run_cli(capsys, "library", "scan", "--json", "--db", db, *folders)
    assert code == 0, err
    return json.loads(out)


def _small_files(folder, n: int) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"emb{i:03d}.safetensors"
        save_file({"emb": torch.full((4,), float(i))}, str(path))
        paths.append(path)
    return paths


def test_second_scan_reads_only_what_changed(tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    files = _small_files(tmp_path / "models", 200)
    first = _scan(capsys, db, tmp_path / "models")
    assert (first["files"], first["new"], first["hashed"]) == (200, 200, 200)
    again = _scan(capsys, db, tmp_path / "models")
    assert (again["unchanged"], again["hashed"]) == (200, 0)

    st = os.stat(files[7])
    os.utime(files[7], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = _scan(capsys, db, tmp_path / "models")
    assert (touched["hashed"], touched["changed"], touched["unchanged"]) == (1, 1, 199)

    sub = tmp_path / "models" / "moved"
    sub.mkdir()
    os.rename(files[3], sub / "renamed.safetensors")  # renamed and moved: same inode
    moved = _scan(capsys, db, tmp_path / "models")
    assert (moved["hashed"], moved["moved"], moved["removed"]) == (0, 1, 0)
    with open_library(str(db)) as conn:
        assert len(queries.list_models(conn)) == 200
        found = queries.model(conn, str(sub / "renamed.safetensors"))
        assert found["sha256"] and queries.model(conn, str(files[3])) is None

    os.link(files[5], tmp_path / "models" / "linked.safetensors")  # a hard link
    files[9].unlink()
    linked = _scan(capsys, db, tmp_path / "models")
    assert (linked["hashed"], linked["linked"], linked["removed"]) == (0, 1, 1)
    with open_library(str(db)) as conn:
        same = [m["display"] for m in queries.duplicates(conn)["identical"][0]["files"]]
        assert [os.path.basename(p) for p in same] == ["emb005.safetensors",
                                                       "linked.safetensors"]


def test_interrupted_scan_keeps_what_it_indexed(tmp_path, capsys, monkeypatch):
    db = tmp_path / "lib.sqlite"
    _small_files(tmp_path / "m", 5)
    real = index._read
    calls = []

    def interrupted(path, progress):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, progress)

    monkeypatch.setattr(index, "_read", interrupted)
    code, _, err = run_cli(capsys, "library", "scan", "--db", db, tmp_path / "m")
    assert code == 130 and "kept" in err and "Traceback" not in err
    monkeypatch.setattr(index, "_read", real)
    resumed = _scan(capsys, db, tmp_path / "m")
    assert (resumed["unchanged"], resumed["hashed"]) == (2, 3)


def test_sidecars_and_filters(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    lora = models / "style.safetensors"
    sample("sd1", str(models / "base.safetensors"), tiny=True)
    save_file({"emb": torch.zeros(4)}, str(lora))
    (models / "style.civitai.info").write_text(json.dumps(
        {"id": 7, "modelId": 3, "baseModel": "SD 1.5", "model": {"name": "Style"},
         "trainedWords": ["sty"]}))
    (models / "style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (models / "base.json").write_text(json.dumps({"sd version": "SD1",
                                                  "activation text": "x"}))
    db = tmp_path / "lib.sqlite"
    _scan(capsys, db, models)
    code, out, _ = run_cli(capsys, "library", "list", "--json", "--db", db, "--base", "sd 1.5")
    found = json.loads(out)
    assert [m["name"] for m in found] == ["style.safetensors"]
    assert found[0]["title"] == "Style" and found[0]["preview"].endswith("style.preview.png")
    code, out, _ = run_cli(capsys, "library", "show", "--json", "--db", db, lora)
    shown = json.loads(out)
    assert {s["kind"] for s in shown["sidecars"]} == {"civitai-info", "preview"}
    assert shown["sidecars"][0]["says"]["trigger_words"] == ["sty"]
    code, out, _ = run_cli(capsys, "library", "list", "--json", "--db", db,
                           "--kind", "checkpoint", "--family", "sd1")
    assert code == 0
    assert [m["name"] for m in json.loads(out)] == ["base.safetensors"]
    # a sidecar that changes is read again, without rehashing the model
    (models / "style.civitai.info").write_text(json.dumps({"baseModel": "SDXL 1.0"}))
    again = _scan(capsys, db, models)
    assert (again["hashed"], again["sidecars_updated"]) == (0, 1)
    _, out, _ = run_cli(capsys, "library", "find", "--json", "--db", db,
                        shown["hashes"]["autov3"][:12])
    assert [m["name"] for m in json.loads(out)] == ["style.safetensors"]


def test_unsafe_pickle_is_hashed_not_opened(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    models = tmp_path / "m"
    models.mkdir()
    with open(models / "evil.ckpt", "wb") as f:
        pickle.dump(Evil(), f)
    stats = _scan(capsys, tmp_path / "lib.sqlite", models)
    assert stats["verdicts"] == {"unsafe": 1}
    _, out, _ = run_cli(capsys, "library", "list", "--json", "--db",
                        tmp_path / "lib.sqlite", "--verdict", "unsafe")
    (found,) = json.loads(out)
    assert found["sha256"] and found["kind"] is None


def test_two_scans_at_once(tmp_path):
    """Two scans of the same folder at once, each with its own connection: the database is
    consistent and holds each file once."""
    _small_files(tmp_path / "m", 40)
    db = str(tmp_path / "lib.sqlite")
    open_library(db).close()
    errors = []

    def run():
        try:
            conn = open_library(db)
            index.scan_library(conn, [str(tmp_path / "m")])
            conn.close()
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone() == (40, 40)


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_a_library_that_is_not_there(tmp_path, capsys, what):
    db = tmp_path / "nothing.sqlite"
    if what == "folder":
        db.mkdir()
    code, _, err = run_cli(capsys, "library", "list", "--db", db)
    assert code == 2 and err.count("\n") == 1 and str(db) in err
