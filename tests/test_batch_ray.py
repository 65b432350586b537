"""``ckpt batch --ray`` on a two-node Ray cluster started on 127.0.0.1 (``ray_cluster``).

Marked ``ray`` (run by ``.ci/run`` with ``-m ray``). Ray and pyarrow are imported at the top:
without them these tests fail, they are not skipped. Over 2,000 files of every kind (with a
file that hangs its reader and one that crashes it: the batch's test hook), the rows must
equal the local pool's; a worker process killed mid-run must cost nothing (no file lost,
none twice); an interrupted Ray run must be finished by ``--resume``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401  (a missing Ray fails here)

from ckptkit.batch import listing, run_batch
from ckptkit.batch.work import FAULTS_ENV

sys.path.insert(0, os.path.dirname(__file__))
import batch_files
import ray_cluster

pytestmark = pytest.mark.ray
FAULTS = "hang:HANG,crash:CRASH"
TIMEOUT = 10  # seconds: the file that hangs costs this; a busy machine must not reach it


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    # not module_tmp: Ray's socket paths under this folder must stay under 107 bytes
    with ray_cluster.cluster(str(tmp_path_factory.mktemp("ray"))) as address:
        yield address


@pytest.fixture(scope="module")
def files(module_tmp):
    root = module_tmp("files")
    batch_files.build(str(root), 2000, faults=["HANG.safetensors", "CRASH.safetensors"])
    return root


@pytest.fixture(scope="module")
def local(files, module_tmp):
    """The local pool's results: what every Ray run must equal."""
    out = module_tmp("local") / "r.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULTS_ENV, FAULTS)
        summary = run_batch("scan", [str(files)], str(out), workers=2, timeout=TIMEOUT)
    assert summary.files == 2002 and summary.duplicates == 0
    return pq.read_table(out)


@pytest.fixture(autouse=True)
def _faults(monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, FAULTS)


def test_ray_rows_equal_the_local_runs(address, files, local, tmp_path):
    out = tmp_path / "r.parquet"
    summary = run_batch("scan", [str(files)], str(out), ray=address, timeout=TIMEOUT)
    table = pq.read_table(out)
    assert table.equals(local)
    assert summary.duplicates == 0 and summary.done == 2002
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows[str(files / "originals" / "HANG.safetensors")]["error"].startswith("timed out")
    assert "crashed twice" in rows[str(files / "originals" / "CRASH.safetensors")]["error"]
    assert os.listdir(files / "markers") == []


def test_hash_and_inspect_on_ray_equal_local(address, files, tmp_path):
    originals = str(files / "originals")
    for op in ("inspect", "hash"):
        run_batch(op, [originals], str(tmp_path / f"{op}-local.parquet"), workers=2,
                  timeout=TIMEOUT)
        run_batch(op, [originals], str(tmp_path / f"{op}-ray.parquet"), ray=address,
                  timeout=TIMEOUT)
        ours = pq.read_table(tmp_path / f"{op}-ray.parquet")
        local = pq.read_table(tmp_path / f"{op}-local.parquet")
        assert ours.equals(local), (op, _differing(ours, local))
    assert ours.column("sha256").null_count == 2  # the files that hang and crash the reader


def _differing(ours, local) -> list[tuple[dict, dict]]:
    """The rows that differ (a few), Ray's beside the local run's, for a failure's message:
    a file that reached the time limit in one run only, say."""
    theirs = {row["path"]: row for row in local.to_pylist()}
    return [(row, theirs.get(row["path"])) for row in ours.to_pylist()
            if row != theirs.get(row["path"])][:3]


def _actors() -> list[int]:
    """Pids of the processes Ray Data runs the map actors in."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::MapWorker"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


class _Killer:
    """A progress that SIGKILLs one Ray actor process once ``after`` files are done."""

    def __init__(self, after: int):
        self.after, self.items, self.killed = after, 0, []

    def start(self, total_bytes, total_items):
        pass

    def update(self, nbytes, items=0):
        self.items += items
        if self.items >= self.after and not self.killed:
            actors = _actors()
            assert actors, "no Ray Data actor process found to kill"
            os.kill(actors[0], signal.SIGKILL)
            self.killed.append(actors[0])

    def failed(self):
        pass


def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(address, files, local,
                                                                 tmp_path):
    out = tmp_path / "r.parquet"
    killer = _Killer(300)
    summary = run_batch("scan", [str(files)], str(out), ray=address, timeout=TIMEOUT,
                        progress=killer)
    assert killer.killed
    assert summary.duplicates == 0 and summary.done == 2002
    assert pq.read_table(out).equals(local)



def test_resume_after_an_interrupted_ray_run(address, files, local, tmp_path):
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_batch("scan", [str(files)], str(out), ray=address, timeout=TIMEOUT,
                  progress=batch_files.Interrupt(800), flush_rows=100)
    summary = run_batch("scan", [str(files)], str(out), ray=address, timeout=TIMEOUT,
                        resume=True)
    assert summary.resumed >= 800 and summary.resumed + summary.done == 2002
    assert summary.duplicates == 0
    assert pq.read_table(out).equals(local)


class _Arrived:
    """A progress that says when the first row has come back."""

    def __init__(self):
        self.first = threading.Event()

    def start(self, total_bytes, total_items):
        pass

    def update(self, nbytes, items=0):
        self.first.set()

    def failed(self):
        pass


def test_rows_come_back_while_the_listing_is_walked(address, files, local, tmp_path,
                                                    monkeypatch):
    """The driver walks the listing as the run goes: here the walk stops after 500 files
    until a first row has come back (with a walk done before the run, it never would)."""
    real = listing.files
    progress = _Arrived()
    waited = []

    def slow(sources):
        for i, item in enumerate(real(sources)):
            if i == 500:
                waited.append(progress.first.wait(120))
            yield item

    monkeypatch.setattr(listing, "files", slow)
    out = tmp_path / "r.parquet"
    summary = run_batch("scan", [str(files)], str(out), ray=address, timeout=TIMEOUT,
                        progress=progress)
    assert waited == [True]
    assert summary.done == 2002 and pq.read_table(out).equals(local)
