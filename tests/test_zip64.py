"""ZIP64 archives, as torch writes for checkpoints over 4 GB, without writing 4 GB: Python's
zipfile is told that 4 GB is 100 bytes, so it writes the ZIP64 extra fields, end record and
locator for small members; our reader must find every member and byte where zipfile put them."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from ckptkit.errors import UnsafeFileError
from ckptkit.formats import open_checkpoint


def _state_pickle(n: int) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.arange(n, dtype=torch.float32)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(name for name in z.namelist() if name.endswith("data.pkl")))


@pytest.fixture
def zip64_everything(monkeypatch):
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)


def test_zip64_records_and_extra_fields_are_read(tmp_path, zip64_everything):
    n = 64
    path = tmp_path / "zip64.pt"
    data = torch.arange(n, dtype=torch.float32).numpy().tobytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _state_pickle(n))
        with z.open("archive/data/0", "w", force_zip64=True) as member:
            member.write(data)
        z.writestr("archive/version", b"3\n")
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator
    with open_checkpoint(path) as ck:
        assert ck["w"].read().tolist() == list(range(n))
    assert torch.load(path, weights_only=True)["w"].tolist() == list(range(n))


def test_zip64_end_record_disagreeing_with_the_classic_one_is_refused(tmp_path,
                                                                      zip64_everything):
    path = tmp_path / "bad64.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/version", b"3\n")
        z.writestr("archive/byteorder", b"little")
    raw = bytearray(path.read_bytes())
    eocd = raw.rindex(b"PK\x05\x06")
    raw[eocd + 10:eocd + 12] = (2).to_bytes(2, "little")  # classic entry count: 2, not 3
    raw[eocd + 8:eocd + 10] = (2).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsafeFileError, match="disagree"):
        open_checkpoint(path)
