"""Row reads and slice-at-a-time casting: the same values as whole-tensor torch operations."""

import errno
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptkit.engine import slices
from ckptkit.errors import OutputError
from ckptkit.formats import open_checkpoint
from ckptkit.ops.prune import prune


@pytest.fixture
def weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(37, 11, 3, generator=gen) * 3e4,
             "vec": torch.randn(5, generator=gen), "scalar": torch.tensor(2.5),
             "matrix": torch.randn(6, 8, generator=gen)}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path, state


def test_read_rows_reads_only_those_rows(weights):
    path, state = weights
    with open_checkpoint(str(path)) as ck:
        assert torch.equal(ck["big"].read_rows(4, 9), state["big"][4:9])
        assert torch.equal(ck["big"].read_rows(30, 99), state["big"][30:])
        assert ck["big"].read_rows(37, 40).shape == (0, 11, 3)


def test_a_cast_in_many_slices_equals_the_whole_cast(weights, tmp_path, monkeypatch):
    path, state = weights
    monkeypatch.setattr(slices, "SLICE_ELEMENTS", 40)  # about one row of "big" per slice
    out = tmp_path / "fp16.safetensors"
    report = prune(str(path), str(out), dtype="fp16")
    got = load_file(str(out))
    for key, value in state.items():
        assert torch.equal(got[key], value.clamp(-65504, 65504).half()), key
    assert report.clamped["big"] == int((state["big"].abs() > 65504).sum()) > 0


def _cast_with(tmp_path, path, name):
    out = tmp_path / name
    prune(str(path), str(out), dtype="bf16")
    return out


def test_the_mapped_output_and_the_written_one_are_the_same_bytes(weights, tmp_path,
                                                                   monkeypatch):
    """Casts are produced straight into the mapped output file; where the file system
    cannot reserve the blocks first, the same bytes are written the usual way."""
    path, _ = weights
    mapped = _cast_with(tmp_path, path, "mapped.safetensors")

    def unsupported(*_):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    written = _cast_with(tmp_path, path, "written.safetensors")
    assert mapped.read_bytes() == written.read_bytes()


def test_a_full_disk_is_an_error_before_anything_is_mapped(weights, tmp_path, monkeypatch):
    path, _ = weights

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="no room for"):
        _cast_with(tmp_path, path, "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
