"""File hashes the community uses to name models, computed in one streamed pass.

``sha256`` (the full file; AUTOMATIC1111's "AutoV2" short hash is its first 10 hex digits)
and Civitai's "AutoV3" (the SHA-256 of what follows a safetensors header, which survives
metadata edits: bytes 8+N to the end when the first 8 bytes read as N < 16 MiB, else bytes 8
to the end, for every file type). The file is read in large chunks, never held in memory.

A file's SHA-256 is remembered (by path, size, modification time, inode and status-change
time, in ``sha256.json`` of ckptkit's cache folder) so that the outputs of later operations
can name their inputs by hash without reading them again; ``BackgroundSha256`` hashes the
inputs of an operation in a worker thread while the operation reads them too. The change
time is what makes the shortcut trustworthy: a file rewritten in place with the same size
can be given its old modification time back (``os.utime``, ``touch -r``), but every write
and every ``utime`` sets the change time to now, and nothing but the kernel sets it. The
cache is only a shortcut: an entry that is not a well-formed hash, or a file that is not
JSON (or nested too deeply to read), is ignored, and rewritten on the next hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading

from ..engine.writer import Progress

CHUNK = 1 << 24
SHA256 = re.compile(r"[0-9a-f]{64}")  # a SHA-256 as hex, as this cache and recipes write it


def _chunks(path: str):
    """The file's bytes in order, as views of one reused buffer (no allocation per chunk):
    each view is valid until the next one is taken."""
    buffer = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            yield buffer[:n]


def file_hashes(path: str, progress: Progress | None = None) -> dict[str, str]:
    identity = _identity(path)
    size = identity[1][0]
    whole, after_header = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 1 << 63
    skip = 8 + n if n < 16 * 1024 * 1024 else 8
    if progress:
        progress.start(size, 1)
    position = 0
    for chunk in _chunks(path):
        whole.update(chunk)
        if position + len(chunk) > skip:
            after_header.update(chunk[max(0, skip - position):])
        position += len(chunk)
        if progress:
            progress.update(len(chunk), 0)
    sha = whole.hexdigest()
    _remember(identity, sha)
    return {"sha256": sha, "autov2": sha[:10], "autov3": after_header.hexdigest()}


def cache_dir() -> str:
    """``$CKPTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckptkit``, else ``~/.cache/ckptkit``."""
    explicit = os.environ.get("CKPTKIT_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckptkit")


def _identity(path: str) -> tuple[str, list[int]]:
    st = os.stat(path)
    return os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _well_formed(entry: object) -> bool:
    """``{"stat": [4 integers], "sha256": 64 lowercase hex digits}``: what ``_remember``
    writes; anything else (an older key, a hand edit, a nested value) is dropped."""
    if not isinstance(entry, dict) or set(entry) != {"stat", "sha256"}:
        return False
    stat, sha = entry["stat"], entry["sha256"]
    return (isinstance(stat, list) and len(stat) == 4
            and all(type(v) is int for v in stat)
            and isinstance(sha, str) and SHA256.fullmatch(sha) is not None)


def _load_cache() -> dict[str, dict]:
    """The remembered entries that are well formed; none if the file is not readable JSON."""
    try:
        with open(os.path.join(cache_dir(), "sha256.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if _well_formed(v)}


def _remember(identity: tuple[str, list[int]], sha: str) -> None:
    """Records a file's hash under its identity taken before it was read (a file changed
    while it was hashed then no longer matches); a cache that cannot be written is only a
    missed shortcut."""
    name, stat = identity
    try:
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        data = _load_cache()
        data[name] = {"stat": stat, "sha256": sha}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sha256.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, os.path.join(folder, "sha256.json"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def cached_sha256(path: str) -> str | None:
    """The remembered SHA-256 of ``path`` if the file has not changed since it was hashed."""
    try:
        name, stat = _identity(path)
    except OSError:
        return None
    entry = _load_cache().get(name)
    return entry["sha256"] if entry is not None and entry["stat"] == stat else None


def sha256(path: str, stop: threading.Event | None = None) -> str | None:
    """The file's SHA-256 (remembered, or computed and remembered); None when ``stop`` is
    set before it is done."""
    known = cached_sha256(path)
    if known:
        return known
    identity = _identity(path)
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        if stop is not None and stop.is_set():
            return None
        digest.update(chunk)
    sha = digest.hexdigest()
    _remember(identity, sha)
    return sha


class BackgroundSha256:
    """Hashes ``paths`` in a worker thread (hashlib and file reads release the GIL), so an
    operation that reads the same files meanwhile pays little more than the CPU time."""

    def __init__(self, paths: list[str]):
        self._paths = list(dict.fromkeys(paths))
        self._results: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptkit-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for path in self._paths:
            try:
                self._results[path] = sha256(path, self._stop)
            except OSError:
                self._results[path] = None

    def result(self) -> dict[str, str | None]:
        """Each path's SHA-256 (None where it could not be read), once all are done."""
        self._thread.join()
        return dict(self._results)

    def cancel(self) -> None:
        self._stop.set()


def lora_sha256(path: str) -> str:
    """A LoRA's hash as AUTOMATIC1111 records it (``Lora hashes``, the first 12 digits;
    Civitai's AutoV3): for a ``.safetensors`` file the SHA-256 of the bytes after its header,
    so that editing the metadata keeps it ("addnet" hash: A1111's
    ``extensions-builtin/Lora/network.py`` with ``modules/hashes.py``), else of the whole file."""
    if not path.lower().endswith(".safetensors"):
        return sha256(path) or ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
