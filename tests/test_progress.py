"""The progress bar: one bar for a job of several files, its counts never past its totals."""

from __future__ import annotations

import io

from ckptkit.cli.progress import ProgressBar
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample


def _last_frame(stream: io.StringIO) -> str:
    return stream.getvalue().split("\r")[-1]


def test_each_file_of_a_job_adds_to_the_totals():
    stream = io.StringIO()
    bar = ProgressBar("split", enabled=True, stream=stream)
    bar.start(100, 2)
    bar.update(100, 2)
    bar.start(50, 1)
    bar.update(50, 1)
    bar.close()
    frame = _last_frame(stream)
    assert "100%" in frame and "3/3 tensors" in frame and "150 B/150 B" in frame


def test_split_ends_at_its_totals(tmp_path):
    src = tmp_path / "m.safetensors"
    sample("sd1", str(src), tiny=True)
    stream = io.StringIO()
    bar = ProgressBar("split", enabled=True, stream=stream)
    split(str(src), str(tmp_path / "parts"), progress=bar)
    bar.close()
    assert bar.items == bar.total_items > 0 and bar.bytes == bar.total_bytes > 0
    assert "100%" in _last_frame(stream)
