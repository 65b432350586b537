"""The safetensors writer's data path (engine/appender): every kind of produced data (tensors,
bytes, copies of input ranges, tensors computed in the buffer, holes) appended through two
reused buffers and written in whole blocks. Read back by the ``safetensors`` library, and
the same bytes however the writes are cut and whether or not the file system takes direct
writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from failing_writes import refuse_direct_io
from safetensors.torch import load_file, save_file

from ckptkit.engine import appender
from ckptkit.engine.writer import CopyRange, Planned, Zeros, write_safetensors
from ckptkit.formats.dtypes import from_torch
from ckptkit.formats.source import Source


def _values() -> dict[str, torch.Tensor]:
    """Sizes that straddle blocks and batches: odd vectors, a matrix larger than a one-block
    batch, fp16 and int8 pieces."""
    gen = torch.Generator().manual_seed(3)
    return {"a": torch.randn(37, generator=gen),
            "b": torch.randn(130, 70, generator=gen).half(),
            "c": torch.randint(-128, 127, (4099,), generator=gen, dtype=torch.int8),
            "d": torch.randn(1001, generator=gen),
            "e": torch.randn(3, 5, 7, generator=gen)}


def _plan(source: Source, offsets: dict[str, tuple[int, int]]) -> list[Planned]:
    """Each tensor made a different way: returned, given as bytes, copied from the input
    file, computed in the writer's buffer, copied as two ranges."""
    v = _values()

    def dt(key):
        return from_torch(v[key].dtype)

    def into(out):
        out.copy_(v["d"])

    start, stop = offsets["b"]
    middle = start + 4097  # an odd cut: ranges are bytes
    return [Planned("a", dt("a"), (37,), lambda: v["a"].clone()),
            Planned("c", dt("c"), (4099,), lambda: v["c"].numpy().tobytes()),
            Planned("e", dt("e"), (3, 5, 7), lambda: CopyRange(source, *_span(offsets["e"]))),
            Planned("d", dt("d"), (1001,), lambda: None, into),
            Planned("b", dt("b"), (130, 70), lambda: (CopyRange(source, start, middle - start),
                                                      CopyRange(source, middle, stop - middle)))]


def _span(offsets: tuple[int, int]) -> tuple[int, int]:
    return offsets[0], offsets[1] - offsets[0]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file(_values(), str(path))
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    offsets = {k: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1])
               for k, v in header.items() if k != "__metadata__"}
    handle = Source(str(path))
    yield handle, offsets
    handle.close()


def _write(path, source) -> bytes:
    write_safetensors(str(path), _plan(*source), {"note": "appender"}, fsync=False)
    return path.read_bytes()


@pytest.mark.parametrize("batch", [appender.BLOCK, 3 * appender.BLOCK + 5, appender.BATCH])
def test_every_kind_of_data_reads_back_however_the_writes_are_cut(batch, source, tmp_path,
                                                                    monkeypatch):
    whole = _write(tmp_path / "whole.safetensors", source)
    monkeypatch.setattr(appender, "BATCH", batch)
    cut = _write(tmp_path / "cut.safetensors", source)
    assert cut == whole
    got = load_file(str(tmp_path / "cut.safetensors"))
    for key, value in _values().items():
        assert torch.equal(got[key], value), key


def test_the_same_bytes_where_direct_writes_are_refused(source, tmp_path, monkeypatch):
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    direct = _write(tmp_path / "direct.safetensors", source)
    refuse_direct_io(monkeypatch)
    assert _write(tmp_path / "buffered.safetensors", source) == direct


def test_zeros_stay_holes_between_written_tensors(tmp_path, monkeypatch):
    """A sample's ``Zeros`` leave holes (no blocks), also after data that ends mid-block and
    before data that starts mid-block; the bytes read as zeros."""
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    f32 = from_torch(torch.float32)
    head, tail = torch.arange(1001.0), torch.arange(333.0)
    big = 1 << 22  # 16 MiB of zeros
    planned = [Planned("head", f32, (1001,), lambda: head.clone()),
               Planned("hole", f32, (big,), lambda: Zeros(4 * big)),
               Planned("tail", f32, (333,), lambda: tail.clone())]
    path = tmp_path / "sparse.safetensors"
    write_safetensors(str(path), planned, fsync=False)
    assert os.stat(path).st_blocks * 512 < 1 << 20
    got = load_file(str(path))
    assert torch.equal(got["head"], head) and torch.equal(got["tail"], tail)
    assert not got["hole"].any()
