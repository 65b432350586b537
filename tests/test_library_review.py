"""Review of ``ckpt hash`` and ``ckpt library`` as a user meets them: odd files in a models
folder, a database moved under it, concurrent scans, the web server's refusals."""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch
from helpers import run_cli, time_limit
from safetensors.torch import save_file


@pytest.fixture
def folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
              str(models / "a.safetensors"))
    return models


def test_a_named_pipe_is_refused_by_hash_and_skipped_by_scan_without_waiting(
        folder, tmp_path, capsys):
    pipe = folder / "pipe.safetensors"
    os.mkfifo(pipe)
    with time_limit(20):
        code, out, err = run_cli(capsys, "hash", pipe, "--quiet")
    assert code == 3 and "pipe.safetensors" in err and "regular file" in err
    assert "Traceback" not in err and not out
    db = tmp_path / "lib.db"
    with time_limit(20):
        code, out, err = run_cli(capsys, "library", "scan", folder, "--db", db, "--quiet")
    assert code == 3 and "pipe.safetensors" in err and "Traceback" not in err
    rows = sqlite3.connect(db).execute("SELECT name FROM files").fetchall()
    assert rows == [("a.safetensors",)]
