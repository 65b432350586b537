"""The pool's protocol: children answer in groups and say in shared memory which file they
are on, so a file that crashes or hangs its reader while the answers of the files before it
are still held by the child costs only that file: those are done again, none twice."""

from __future__ import annotations

import os
import sys

import pyarrow.parquet as pq
import pytest

from ckptkit.batch import run_batch, work
from ckptkit.batch.work import FAULTS_ENV
from ckptkit.ops.scan import scan_file

sys.path.insert(0, os.path.dirname(__file__))
import batch_files


@pytest.mark.parametrize("fault", ["CRASH", "HANG"])
def test_a_fault_inside_a_group_costs_only_its_file(tmp_path, monkeypatch, fault):
    originals = batch_files.originals(str(tmp_path / "src"), hostile=False)
    files = tmp_path / "files"
    # The fault at 021: after the first group of 16, the child holds 5 answers.
    names = batch_files.numbered(str(files), (originals * 3)[:40],
                                 [f"021-{fault}.safetensors"])
    assert work.GROUP == 16
    monkeypatch.setenv(FAULTS_ENV, f"{fault.lower()}:{fault}")
    out = tmp_path / "r.parquet"
    summary = run_batch("scan", [str(files)], str(out), workers=1, timeout=3)
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == sorted(names)
    assert summary.done == 41 and summary.duplicates == 0
    for row in rows:
        if fault in row["path"]:
            assert row["error"] == ("the reader crashed twice (its process exited with code 77)"
                                    if fault == "CRASH" else
                                    "timed out after 3 s (the reader was stopped)")
        else:
            assert row["verdict"] == scan_file(names[row["path"]]).verdict, row["path"]
