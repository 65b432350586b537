"""``ckpt batch``'s local pieces beyond the pool: the hash cache left alone by a parameter,
not a module switch."""

from __future__ import annotations

import os
import sys

from ckptkit.ops.hashing import cached_sha256
from ckptkit.ops.model_hash import hash_file
from ckptkit.ops.sample import sample

sys.path.insert(0, os.path.dirname(__file__))


def test_hash_file_remembers_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tmp_path / "sd1.safetensors")
    sample("sd1", path, tiny=True)
    found = hash_file(path, remember=False)
    assert cached_sha256(path) is None and not (tmp_path / "cache" / "sha256.json").exists()
    assert hash_file(path)["sha256"] == found["sha256"]
    assert cached_sha256(path) == found["sha256"]


def test_inspect_quantization_is_the_librarys(tmp_path, capsys):
    """GGUF (written by the gguf package's own writer and quantizer, as city96's converter
    does), scaled fp8 and NF4 files: the batch's ``quantization`` is what ``ckpt library``
    stores for the same files (tiny models keep most parameters in F16: still Q8_0/NF4)."""
    import sqlite3

    import pyarrow.parquet as pq
    import quant_read_files

    from ckptkit.batch import run_batch
    from ckptkit.cli.main import main
    from ckptkit.ops.quantize import quantize

    models = tmp_path / "models"
    models.mkdir()
    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype="bf16", components=["diffusion_model"])
    quant_read_files.city96_gguf(src, models / "q8.gguf", quant_read_files.QT.Q8_0, "flux")
    quantize(str(src), str(models / "fp8.safetensors"), "fp8-scaled")
    quantize(str(src), str(models / "nf4.safetensors"), "nf4")
    sample("sd1", str(models / "sd1-fp8.safetensors"), tiny=True, dtype="fp8-e4m3fn")
    sample("sd1", str(models / "sd1.safetensors"), tiny=True)
    out = tmp_path / "r.parquet"
    run_batch("inspect", [str(models)], str(out), workers=1)
    batch = {os.path.basename(r["path"]): r["quantization"] for r in pq.read_table(out).to_pylist()}
    db = tmp_path / "lib.db"
    assert main(["library", "scan", str(models), "--db", str(db), "--quiet"]) == 0
    library = dict(sqlite3.connect(db).execute("SELECT name, quantization FROM files"))
    assert batch == library
    assert batch == {"q8.gguf": "Q8_0", "fp8.safetensors": "scaled-fp8", "nf4.safetensors": "NF4",
                     "sd1-fp8.safetensors": "f8_e4m3", "sd1.safetensors": None}
    capsys.readouterr()
