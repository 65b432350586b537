"""``ckpt scan`` sniffs each file's start once: the format it reports and the opening that
judges the file share one ``detect_format``."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import ckptkit.formats as formats
from ckptkit.ops import scan


@pytest.mark.parametrize(("name", "write", "verdict"), [
    ("model.safetensors", lambda p: save_file({"w": torch.ones(2)}, str(p)), scan.SAFE),
    ("model.ckpt", lambda p: torch.save({"w": torch.ones(2)}, p), scan.SAFE),
    ("page.safetensors", lambda p: p.write_text("<html>Bad gateway</html>"), scan.ERROR),
    ("evil.pt", lambda p: p.write_bytes(pickle.dumps(print)), scan.UNSAFE),
])
def test_each_file_is_sniffed_once(tmp_path, monkeypatch, name, write, verdict):
    path = tmp_path / name
    write(path)
    calls = []

    def counted(p):
        calls.append(p)
        return real(p)

    real = formats.detect_format
    monkeypatch.setattr(formats, "detect_format", counted)
    monkeypatch.setattr(scan, "detect_format", counted)
    result = scan.scan_file(str(path))
    assert result.verdict == verdict, result.reasons
    assert calls == [str(path)]
