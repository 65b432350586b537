"""The GGUF writer's data path: tensors produced into reused buffers and written in whole
blocks, bypassing the page cache where the file system allows it. Held to the bytes the
``gguf`` package's own writer gives for the same tensors, however the writes are cut
(batches of one block, tensors larger than a batch), and where direct writes are refused at
open or at a write; a full disk is an error that leaves nothing behind."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest
import torch
from failing_writes import O_DIRECT, fill_the_disk, refuse_direct_io

from ckptkit.engine import appender
from ckptkit.engine.gguf_writer import GGUFTensor, write_gguf
from ckptkit.errors import OutputError

pytest.importorskip("gguf")
from quant_read_files import QT, random_blocks
from quant_read_files import write_gguf as gguf_package_writes


def _tensors() -> dict:
    """Sizes that straddle blocks: odd float32 vectors, a float16 matrix, Q8_0 weights of a
    few blocks and one of 45 KB (larger than a one-block batch)."""
    rng = np.random.default_rng(7)
    return {
        "a.bias": rng.standard_normal(37).astype(np.float32),
        "a.weight": ("Q8_0", random_blocks(QT.Q8_0, 24 * 5, seed=1).reshape(24, 5 * 34)),
        "b.norm": rng.standard_normal(1).astype(np.float32),
        "b.weight": rng.standard_normal((33, 70)).astype(np.float16),
        "c.weight": ("Q8_0", random_blocks(QT.Q8_0, 1331, seed=2).reshape(121, 11 * 34)),
        "c.bias": rng.standard_normal(1001).astype(np.float32),
    }


def _planned(tensors: dict) -> list[GGUFTensor]:
    def copy(data: np.ndarray, out) -> None:
        out.copy_(torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1)))

    planned = []
    for name, value in tensors.items():
        if isinstance(value, tuple):
            qtype, data = value
            shape = (data.shape[0], data.shape[1] // 34 * 32)
        else:
            data, qtype, shape = value, {"float32": "F32", "float16": "F16"}[
                value.dtype.name], value.shape
        planned.append(GGUFTensor(name, qtype, tuple(shape),
                                  lambda out, data=data: copy(data, out)))
    return planned


METADATA = {"general.architecture": "flux", "general.quantization_version": 2,
            "general.file_type": 7, "general.name": "stream test"}


@pytest.fixture
def expected(tmp_path) -> bytes:
    kv = {k: v for k, v in METADATA.items() if k != "general.architecture"}
    tensors = {k: (v[1], getattr(QT, v[0])) if isinstance(v, tuple) else v
               for k, v in _tensors().items()}
    return gguf_package_writes(tmp_path / "theirs.gguf", tensors, arch="flux",
                               kv=kv).read_bytes()


def _ours(path) -> bytes:
    write_gguf(str(path), METADATA, _planned(_tensors()), fsync=False)
    return path.read_bytes()


def _direct_writes(monkeypatch) -> list[int]:
    """Records the size of every write made through a descriptor opened with O_DIRECT."""
    sizes: list[int] = []
    pwrite = os.pwrite

    def spy(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            sizes.append(len(data))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return sizes


@pytest.mark.parametrize("batch", [appender.BATCH, appender.BLOCK, 3 * 4096 + 5])
def test_same_bytes_as_the_gguf_package_however_the_writes_are_cut(batch, expected, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(appender, "BATCH", batch)
    sizes = _direct_writes(monkeypatch)
    assert _ours(tmp_path / "ours.gguf") == expected
    assert all(size % appender.BLOCK == 0 for size in sizes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.gguf", "theirs.gguf"]


def test_the_data_bypasses_the_page_cache_where_the_file_system_allows(expected, tmp_path,
                                                                      monkeypatch):
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | O_DIRECT))
    except (OSError, TypeError):
        pytest.skip("no O_DIRECT here")
    os.unlink(tmp_path / "probe")
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    sizes = _direct_writes(monkeypatch)
    assert _ours(tmp_path / "ours.gguf") == expected
    assert sum(sizes) == -(-len(expected) // appender.BLOCK) * appender.BLOCK
    assert len(sizes) > 3


def test_the_same_bytes_where_direct_writes_are_refused_at_open(expected, tmp_path,
                                                                monkeypatch):
    refuse_direct_io(monkeypatch)
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    sizes = _direct_writes(monkeypatch)
    assert _ours(tmp_path / "ours.gguf") == expected
    assert sizes == []


def test_the_same_bytes_where_a_direct_write_is_refused(expected, tmp_path, monkeypatch):
    """A device whose block is larger than ours refuses the write (EINVAL): it and the
    rest go through the page cache."""
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    pwrite, refused = os.pwrite, []

    def large_blocks(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", large_blocks)
    assert _ours(tmp_path / "ours.gguf") == expected
    assert len(refused) <= 1


def test_a_full_disk_at_a_write_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    fill_the_disk(monkeypatch)
    with pytest.raises(OutputError, match="no room for"):
        _ours(tmp_path / "ours.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_producer_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(appender, "BATCH", appender.BLOCK)
    planned = _planned(_tensors())

    def broken(out):
        raise RuntimeError("the producer failed")

    planned[4] = GGUFTensor(planned[4].name, planned[4].qtype, planned[4].shape, broken)
    with pytest.raises(RuntimeError, match="producer failed"):
        write_gguf(str(tmp_path / "ours.gguf"), METADATA, planned, fsync=False)
    assert list(tmp_path.iterdir()) == []
