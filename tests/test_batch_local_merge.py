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


def _rows_of(results_path):
    import pyarrow.parquet as pq

    return pq.read_table(results_path).to_pylist()


def test_finish_keeps_the_newest_row_of_each_listed_file(tmp_path, monkeypatch):
    """Parts merged in rounds (a fan-in of 2 over 7 parts), then with an earlier RESULTS: the
    newest row of each file wins (later part, later row), unlisted files are dropped, and
    only rows of the parts count as duplicates."""
    from ckptkit.batch import results as results_mod
    from ckptkit.batch import rows

    monkeypatch.setattr(results_mod, "FAN_IN", 2)
    monkeypatch.setattr(results_mod, "READ_ROWS", 2)
    target = str(tmp_path / "r.parquet")
    first = results_mod.Results(target, False, flush_rows=3)
    for name in "edcba":
        first.add(rows.error_row(f"/m/{name}", 1, 1, "first run"))
    first.finish(None)
    again = results_mod.Results(target, True, flush_rows=3)
    for i, name in enumerate("gfedcbagfe"):  # e, f and g twice in this run's parts
        again.add(rows.error_row(f"/m/{name}", 10 + i, 1, "second run"))
    counts = again.finish({f"/m/{n}".encode() for n in "abcdefg" if n != "c"})
    got = {r["path"]: r for r in _rows_of(target)}
    assert list(got) == [f"/m/{n}" for n in "abdefg"]
    assert {p: r["size"] for p, r in got.items()} == {
        "/m/a": 16, "/m/b": 15, "/m/d": 13, "/m/e": 19, "/m/f": 18, "/m/g": 17}
    assert counts.duplicates == 3 and counts.rows == 6 and counts.errors == 6
    assert counts.verdicts == {"error": 6}
    assert not os.path.exists(target + ".parts")


MEMORY = """
import random, sys
import pyarrow as pa
from ckptkit.batch import results, rows
results.FAN_IN, results.READ_ROWS, results.ROW_GROUP = 4, 128, 1000
n, target = int(sys.argv[1]), sys.argv[2]
out = results.Results(target, False, flush_rows=500)
order = list(range(n))
random.Random(0).shuffle(order)
for i in order:
    out.add(rows.error_row(f"/store/{i:09d}/" + "x" * 200, i, i, "gone " * 40))
counts = out.finish(None)
print(counts.rows, pa.default_memory_pool().max_memory())
"""


def test_finish_memory_does_not_grow_with_the_rows(tmp_path):
    """Peak Arrow memory of a run of 8,000 rows and of one of 32,000 (~0.5 KB each, written
    in shuffled order: every part spans the whole key range) stays about 5 MB: the merge
    holds a few batches per run, never the rows (sorting them all in memory, as before,
    peaked at 20 and 79 MB)."""
    import subprocess

    import pyarrow.parquet as pq

    src = os.path.join(os.path.dirname(__file__), "..", "src")
    peaks = {}
    for n in (8000, 32000):
        target = str(tmp_path / f"r{n}.parquet")
        done = subprocess.run([sys.executable, "-c", MEMORY, str(n), target], check=True,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=src))
        rows_out, peaks[n] = map(int, done.stdout.split())
        assert rows_out == n
        paths = pq.read_table(target, columns=["path"]).column("path").to_pylist()
        assert paths == sorted(paths) and len(set(paths)) == n
    assert 0 < peaks[32000] < 1.5 * peaks[8000], peaks
    assert peaks[32000] < 8 << 20, peaks
