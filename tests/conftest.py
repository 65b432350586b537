"""Shared fixtures: small real checkpoints written by ``torch.save`` itself, and file hashes."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from ckptkit.threads import let_idle_threads_sleep

# As ``ckpt`` does: torch, which the import below loads for every test, reads it once.
let_idle_threads_sleep()

# A test run started in the background by a shell without job control inherits SIGINT
# ignored, and so would every child a test starts (Python keeps an ignored SIGINT ignored):
# the Ctrl-C tests would then test nothing but that. They get the usual handling back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402  (after the setting above)
import torch  # noqa: E402

from ckptkit.samples import demo  # noqa: E402


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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """``module_tmp(name)``: a new folder for what one test module's tests share (samples,
    libraries), removed with its contents when the module is done. ``tmp_path_factory``'s
    folders stay to the end of the run: every module's samples at once (2.2 GB; 5.6 GB with
    a worker per core, each making its own)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Each test remembers file hashes in its own cache folder, never the user's."""
    monkeypatch.setenv("CKPTKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# -- the pipelines' tests (load_pipeline, generate): asked for with usefixtures --------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test; nothing tells the Hub client to stay offline."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: on a busy machine torch's thread pool made each 32-wide
    matrix product take 1.6 ms instead of 30 us (a 2-step SDXL run 3.5 s instead of 0.19)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers(module_tmp):
    """Tiny CLIP BPE and T5 tokenizers written by the tests (tests/tiny_tokenizers.py)."""
    from tiny_tokenizers import write_all

    return write_all(module_tmp("tokenizers"))


@pytest.fixture(scope="module")
def tiny(module_tmp):
    """family -> its tiny monolithic sample (fp32, seed 1), made once per module."""
    from ckptkit.ops.sample import sample

    root = module_tmp("tiny")
    made = {}

    def get(fid: str):
        if fid not in made:
            made[fid] = root / f"{fid}.safetensors"
            sample(fid, str(made[fid]), tiny=True, dtype="fp32", seed=1)
        return made[fid]

    return get
