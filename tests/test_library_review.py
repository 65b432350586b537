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


def test_a_quantized_file_is_indexed_as_quantized_when_most_parameters_stay_f16(
        tmp_path, capsys):
    from ckptkit.ops.quantize import quantize
    from ckptkit.ops.sample import sample

    models = tmp_path / "models"
    models.mkdir()
    src = tmp_path / "flux.safetensors"  # tiny: most rows are not whole blocks, kept in F16
    sample("flux1-dev", str(src), tiny=True, dtype="bf16", components=["diffusion_model"])
    quantize(str(src), str(models / "q.gguf"), "Q4_0")
    quantize(str(src), str(models / "fp8.safetensors"), "fp8-scaled")
    db = tmp_path / "lib.db"
    code, _, err = run_cli(capsys, "library", "scan", models, "--db", db, "--quiet")
    assert code == 0, err
    rows = dict(sqlite3.connect(db).execute("SELECT name, quantization FROM files"))
    assert rows == {"q.gguf": "Q4_0", "fp8.safetensors": "scaled-fp8"}
    code, out, _ = run_cli(capsys, "library", "show", models / "q.gguf", "--db", db)
    assert code == 0 and ", Q4_0" in out


def test_dupes_counts_copies_on_disk_not_names_of_one_file(folder, tmp_path, capsys):
    import json

    os.link(folder / "a.safetensors", folder / "hardlink.safetensors")
    (tmp_path / "through-link").symlink_to(folder)
    db = tmp_path / "lib.db"
    for each in (folder, tmp_path / "through-link"):  # one scan would walk the folder once
        code, _, err = run_cli(capsys, "library", "scan", each, "--db", db, "--quiet")
        assert code == 0, err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM files").fetchone() == (4,)
    code, out, _ = run_cli(capsys, "library", "dupes", "--db", db, "--json")
    found = json.loads(out)
    assert code == 0 and found["saved_bytes"]["identical"] == 0
    assert [(g["copies"], g["saved_bytes"], len(g["files"])) for g in found["identical"]] \
        == [(1, 0, 4)]
    size = (folder / "a.safetensors").stat().st_size
    (folder / "copy.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    for each in (folder, tmp_path / "through-link"):
        run_cli(capsys, "library", "scan", each, "--db", db, "--quiet")
    code, out, _ = run_cli(capsys, "library", "dupes", "--db", db, "--json")
    found = json.loads(out)
    assert [(g["copies"], g["saved_bytes"]) for g in found["identical"]] == [(2, size)]
    assert len(found["identical"][0]["files"]) == 6  # every name, one copy to delete
