"""Shared fixtures: small real checkpoints written by ``torch.save`` itself, and file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ckptkit.samples import demo


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (to show that an input was left unchanged)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def file_sha256():
    return sha256


@pytest.fixture
def demo_ckpt(tmp_path: Path) -> Path:
    """A Lightning-style SD 1.x training checkpoint (``state_dict`` + global_step, optimizer
    states...) saved by ``torch.save`` in the zip format; it holds views of a shared storage."""
    path = tmp_path / "demo.ckpt"
    torch.save(demo.build(), path)
    return path


@pytest.fixture
def demo_ckpt_legacy(tmp_path: Path) -> Path:
    """The same checkpoint in torch's legacy (pre-1.6, non-zip) format."""
    path = tmp_path / "demo_legacy.ckpt"
    torch.save(demo.build(), path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Each test remembers file hashes in its own cache folder, never the user's."""
    monkeypatch.setenv("CKPTKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
