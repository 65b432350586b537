"""``ckpt batch``'s local pieces beyond the pool: the hash cache left alone by a parameter,
not a module switch."""

from __future__ import annotations

from ckptkit.ops.hashing import cached_sha256
from ckptkit.ops.model_hash import hash_file
from ckptkit.ops.sample import sample


def test_hash_file_remembers_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tmp_path / "sd1.safetensors")
    sample("sd1", path, tiny=True)
    found = hash_file(path, remember=False)
    assert cached_sha256(path) is None and not (tmp_path / "cache" / "sha256.json").exists()
    assert hash_file(path)["sha256"] == found["sha256"]
    assert cached_sha256(path) == found["sha256"]
