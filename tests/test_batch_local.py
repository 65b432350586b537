"""``ckpt batch`` in its local process pool: rows against the single-file ops, faults, resume.

The rows are checked against what ``scan_file`` and ``inspect_file`` say of each file on
their own, the hashes against ``hashlib``; a file that hangs and one that crashes its reader
(the batch's test hook, ``work.FAULTS_ENV``) must cost only themselves; an interrupted run
(Ctrl-C, or SIGKILL) must be finished by ``--resume`` with every file once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import blake3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckptkit.batch import run_batch
from ckptkit.batch.work import FAULTS_ENV
from ckptkit.cli.batch_cmd import BatchBar
from ckptkit.cli.main import main
from ckptkit.ops.inspect import inspect_file
from ckptkit.ops.scan import scan_file

sys.path.insert(0, os.path.dirname(__file__))
import batch_files

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture(scope="module")
def folder(module_tmp):
    root = module_tmp("batch")
    paths = batch_files.build(str(root / "files"), 200)
    return root, paths


def read(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def by_path(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


def test_scan_rows_are_scan_files_verdicts(folder, tmp_path):
    root, paths = folder
    out = tmp_path / "r.parquet"
    summary = run_batch("scan", [str(root / "files")], str(out), workers=2)
    rows = read(out)
    assert [r["path"] for r in rows] == sorted(paths)  # each file once, sorted by path
    assert summary.files == summary.done == len(paths) and summary.duplicates == 0
    for row in rows:
        alone = scan_file(row["path"])
        assert row["verdict"] == alone.verdict, row["path"]
        assert [f["message"] for f in row["findings"]] == [r["message"] for r in alone.reasons]
        assert row["size"] == os.path.getsize(row["path"])
        assert row["mtime"].value == os.stat(row["path"]).st_mtime_ns
    verdicts = {r["verdict"] for r in rows}
    assert verdicts == {"safe", "unsafe", "error", "skipped"}
    assert os.listdir(root / "files" / "markers") == []  # no payload ran
    assert summary.exit_code == 4  # unsafe files, as ckpt scan says


def test_inspect_rows_identify_as_inspect_does(folder, tmp_path):
    root, _ = folder
    originals = root / "files" / "originals"
    out = tmp_path / "r.parquet"
    run_batch("inspect", [str(originals)], str(out), workers=2)
    rows = by_path(read(out))
    for name in ("sd1.safetensors", "sd1-fp8.safetensors", "sd1.ckpt", "flux-dit.safetensors",
                 "sdxl-vae.safetensors"):
        path = str(originals / name)
        ident = inspect_file(path)["identification"]
        row = rows[path]
        assert (row["kind"], row["family"], row["layout"]) == (
            ident["kind"], ident["family"], ident["layout"])
        assert row["components"] == [c["name"] for c in ident["components"]]
    assert rows[str(originals / "sd1.safetensors")]["family"] == "sd1"
    assert rows[str(originals / "sd1-fp8.safetensors")]["quantization"] == "f8_e4m3"
    assert rows[str(originals / "sd1.safetensors")]["quantization"] is None
    unsafe = [r for r in rows.values() if r["verdict"] == "unsafe"]
    assert unsafe and all(r["kind"] is None for r in unsafe)  # never opened past the scan


def test_hash_rows_match_hashlib(folder, tmp_path):
    root, _ = folder
    originals = root / "files" / "originals"
    picked = tmp_path / "picked"
    picked.mkdir()
    for name in ("sd1.ckpt", "sd1.safetensors", "sd1-fp8.safetensors", "hostile/zip_os_system.ckpt",
                 "truncated.safetensors", "empty.safetensors", "benign/legacy.ckpt"):
        os.link(originals / name, picked / os.path.basename(name))
    out = tmp_path / "r.parquet"
    run_batch("hash", [str(picked)], str(out), workers=2)
    rows = read(out)
    assert len(rows) == 7
    for row in rows:
        with open(row["path"], "rb") as f:
            data = f.read()
        assert row["sha256"] == hashlib.sha256(data).hexdigest(), row["path"]
        assert row["autov2"] == row["sha256"][:10]
        assert row["blake3"] == blake3.blake3(data).hexdigest()
        assert row["crc32"] == zlib.crc32(data).to_bytes(4, "little").hex()
    digests = {os.path.basename(r["path"]): dict(r["component_digests"]) for r in rows}
    # The same weights as .ckpt and .safetensors: the same content digests.
    assert set(digests["sd1.ckpt"]) == {"diffusion_model", "clip_l", "vae"}
    assert digests["sd1.ckpt"] == digests["sd1.safetensors"]
    assert digests["sd1-fp8.safetensors"]["vae"] != digests["sd1.safetensors"]["vae"]
    assert not digests["zip_os_system.ckpt"]  # unsafe: file hashes only, never opened


def test_batch_hash_leaves_the_hash_cache_alone(folder, tmp_path):
    """A store's millions of files must not go through the one-file cache of ckpt's hashes
    (rewritten whole on every hash). In a process of its own, so that its readers' forkserver
    starts with the cache folder set (this process's may be running already); ``run_batch``
    rather than the CLI, whose imports (twice: the run and its forkserver) took seconds, and
    files whose hashing needs no torch (a pickle's tensors do: seconds a child): checkpoints
    (the component digests' path) and a file that is none (the file hashes alone)."""
    _, paths = folder
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=SRC, CKPTKIT_CACHE_DIR=str(cache))
    listing = tmp_path / "list.txt"
    chosen = [p for p in paths if p.endswith((".safetensors", ".png"))]
    assert any(p.endswith(".png") for p in chosen)
    listing.write_text("\n".join(chosen[:3] + [p for p in chosen if p.endswith(".png")]))
    code = ("import sys; from ckptkit.batch import run_batch; "
            "run_batch('hash', [sys.argv[1]], sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(listing), str(tmp_path / "r.parquet")],
                   env=env, check=True)
    assert pq.read_table(tmp_path / "r.parquet").column("sha256").null_count == 0
    assert not (cache / "sha256.json").exists()


def test_hanging_and_crashing_files_cost_only_themselves(folder, tmp_path, monkeypatch):
    _root, paths = folder
    work = tmp_path / "files"
    names = batch_files.numbered(str(work), paths[:40],
                                 ["050-HANG.safetensors", "051-CRASH.safetensors"])
    monkeypatch.setenv(FAULTS_ENV, "hang:HANG,crash:CRASH")
    out = tmp_path / "r.parquet"
    started = time.monotonic()
    summary = run_batch("scan", [str(work)], str(out), workers=2, timeout=5)
    assert time.monotonic() - started < 60
    rows = by_path(read(out))
    assert sorted(rows) == sorted(names)
    assert rows[str(work / "050-HANG.safetensors")]["error"].startswith("timed out after 5 s")
    crashed = rows[str(work / "051-CRASH.safetensors")]
    assert crashed["verdict"] == "error"
    assert crashed["error"] == "the reader crashed twice (its process exited with code 77)"
    for link, source in names.items():
        if "HANG" not in link and "CRASH" not in link:
            assert rows[link]["verdict"] == scan_file(source).verdict, link
    assert summary.errors >= 2



def test_resume_after_ctrl_c_does_each_file_once(folder, tmp_path):
    root, paths = folder
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_batch("scan", [str(root / "files")], str(out), workers=2,
                  progress=batch_files.Interrupt(120), flush_rows=25)
    assert not out.exists()
    kept = pa.concat_tables([pq.read_table(tmp_path / "r.parquet.parts" / n)
                             for n in os.listdir(tmp_path / "r.parquet.parts")])
    assert kept.num_rows >= 120  # the pending rows were written on the interrupt
    assert main(["batch", "scan", str(root / "files"), "-o", str(out)]) == 2  # not --resume
    summary = run_batch("scan", [str(root / "files")], str(out), workers=2, resume=True)
    assert summary.resumed == kept.num_rows and summary.done == len(paths) - kept.num_rows
    assert summary.duplicates == 0
    assert [r["path"] for r in read(out)] == sorted(paths)
    assert not (tmp_path / "r.parquet.parts").exists()
    fresh = tmp_path / "fresh.parquet"
    run_batch("scan", [str(root / "files")], str(fresh), workers=2)
    assert pq.read_table(out).equals(pq.read_table(fresh))


def test_resume_after_sigkill_and_of_a_changed_file(folder, tmp_path, capsys):
    """A run killed with SIGKILL leaves whole parts (and at most a part cut short under its
    .tmp name, which --resume ignores); --resume finishes it, redoing a file whose mtime
    changed since and dropping a file no longer listed."""
    _root, paths = folder
    files = tmp_path / "files"
    # The first, changed below, is a copy: the others share inodes (and mtimes).
    batch_files.numbered(str(files), paths[:150], ["140-HANG.safetensors"], copy_first=True)
    out = tmp_path / "r.parquet"
    script = ("import sys; from ckptkit.batch import run_batch; "
              "run_batch('scan', [sys.argv[1]], sys.argv[2], workers=2, flush_rows=20)")
    env = dict(os.environ, PYTHONPATH=SRC, **{FAULTS_ENV: "hang:HANG"})
    proc = subprocess.Popen([sys.executable, "-c", script, str(files), str(out)], env=env)
    parts = tmp_path / "r.parquet.parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the run sits on the hanging file
        done = [n for n in os.listdir(parts) if n.endswith(".parquet")] if parts.exists() else []
        if len(done) >= 5:
            break
        time.sleep(0.2)
    below = batch_files.process_tree({proc.pid}) - {proc.pid}
    assert below  # the forkserver and its children, one of them on the hanging file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in below if os.path.exists(f"/proc/{pid}")]  # no orphan left
    assert not out.exists()
    for name in os.listdir(parts):  # the kill may land inside a flush: its .tmp is cut short
        if name.endswith(".parquet"):
            pq.read_table(parts / name)  # a part under its own name is whole
    (parts / "part-999999.parquet.tmp").write_bytes(b"PAR1 cut short")
    os.unlink(files / "140-HANG.safetensors")
    changed = files / "000-" f"{os.path.basename(paths[0])}"
    os.utime(changed, ns=(0, 10**18))
    code = main(["batch", "scan", str(files), "-o", str(out), "--resume", "--json", "--quiet"])
    assert code == 4
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed"] >= 5 * 20 - 1
    assert summary["duplicates"] == 1  # the changed file, done again
    assert summary["resumed"] + summary["done"] == 150
    rows = read(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in files.iterdir())
    assert by_path(rows)[str(changed)]["mtime"].value == 10**18
    assert not parts.exists()


def test_listings_text_and_parquet(folder, tmp_path, capsys):
    root, paths = folder
    listing = tmp_path / "list.txt"
    missing = str(tmp_path / "gone.safetensors")
    listing.write_text("\n".join([*paths[:30], missing, paths[0]]) + "\n")
    out = tmp_path / "r.parquet"
    assert main(["batch", "scan", str(listing), "-o", str(out), "--quiet"]) == 4
    rows = by_path(read(out))
    assert len(rows) == 31  # the path listed twice is done once
    link = tmp_path / "same-folder"
    link.symlink_to(root / "files" / "originals")
    twice = tmp_path / "twice.parquet"
    main(["batch", "scan", str(root / "files" / "originals"), str(link), "-o",
          str(twice), "--quiet"])
    listed = read(twice)
    once = sum(len(names) for _, _, names in os.walk(root / "files" / "originals"))
    assert len(listed) == once + 1  # each file once, plus the link's own "skipped" row
    assert by_path(listed)[str(link)]["verdict"] == "skipped"  # said, not silently dropped
    assert rows[missing]["verdict"] == "error" and rows[missing]["size"] is None
    again = tmp_path / "again.parquet"
    assert main(["batch", "scan", str(out), "-o", str(again), "--quiet"]) == 4
    assert pq.read_table(again).equals(pq.read_table(out))  # a results file is a listing
    capsys.readouterr()
    assert main(["batch", "scan", paths[0], "-o", str(tmp_path / "x.parquet")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a listing" in err


def test_name_that_is_not_utf8(tmp_path, folder):
    _, paths = folder
    files = tmp_path / "files"
    files.mkdir()
    name = os.fsdecode(b"model-\xff.safetensors")
    os.link(paths[0], os.path.join(files, name))
    out = tmp_path / "r.parquet"
    run_batch("scan", [str(files)], str(out), workers=1)
    (row,) = read(out)
    assert row["path_bytes"] == os.fsencode(os.path.join(files, name))
    assert row["path"].endswith("model-\\xff.safetensors")


def test_json_summary_and_progress(folder, tmp_path, capsys):
    root, _paths = folder
    out = tmp_path / "r.parquet"
    assert main(["batch", "scan", str(root / "files" / "originals"), "-o", str(out),
                 "--json"]) == 4
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == summary["done"] == len(read(out))
    assert summary["errors"] == sum(1 for r in read(out) if r["error"] is not None)
    stream = io.StringIO()
    bar = BatchBar("batch scan", enabled=True)
    bar.stream = stream
    bar.start(2048, 2)
    bar.update(1024, 1)
    bar.failed()
    bar.update(1024, 1)
    assert "2/2 files" in stream.getvalue() and "1 error" in stream.getvalue()
