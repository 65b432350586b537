"""File hashes the community uses to name models, every one of them from one streamed read.

What each is, and whose definition it follows (checked at the source):

- ``sha256``: the whole file (A1111 ``modules/hashes.calculate_sha256``; Civitai's "SHA256").
- ``autov1``: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (A1111's
  legacy ``sd_models.model_hash``, kohya ``train_util.model_hash``): a file under 1 MiB
  hashes what is there (``e3b0c442`` for nothing). Civitai (``model-scanner`` HashTask.cs)
  gives none for files under 2 MiB.
- ``autov2``: the first 10 hex digits of ``sha256`` (A1111 ``CheckpointInfo.shorthash``).
- ``autov3``: Civitai's ``CalculateV3HashAndEnsureEmbeddedMetadataFixedAsync``: the SHA-256 of
  what follows a safetensors header, which survives metadata edits: bytes 8+N to the end when
  the first 8 bytes read as N < 16 MiB, else bytes 8 to the end, for every file type. For a
  safetensors file this is kohya's ``sshs_model_hash`` and A1111's LoRA "addnet" hash
  (``hashes.addnet_hash_safetensors``, whose first 12 digits A1111 shows).
- ``crc32``: zlib's CRC-32 as Civitai writes it: .NET's ``Crc32.GetCurrentHash`` gives the
  four bytes little-endian, so "hello world" is ``85114a0d`` where zlib says 0x0d4a1185.
- ``blake3``: BLAKE3 of the whole file, 256 bits (Civitai; Stability Matrix looks models up
  by it).

All are lowercase hex (A1111, kohya and Stability Matrix write lowercase; Civitai shows
uppercase). ``stream_digests`` reads the file once, in large chunks into a few reused
buffers, and feeds each chunk to four threads (hashlib, zlib and blake3 release the GIL):
the whole-file SHA-256, the AutoV3 SHA-256, BLAKE3 with CRC-32 and the AutoV1 window, and
the digests of byte ranges a caller asks for (``ops.model_hash``: each tensor of a model's
components); a file that fits in one chunk is hashed on the calling thread. Two SHA-256
of nearly the whole file are the bulk of the CPU time.

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

import contextlib
import hashlib
import json
import os
import queue
import re
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence

import blake3

from ..engine.writer import Progress
from ..errors import FormatError
from ..formats.sniff import path_problem

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
    """The six hashes of ``path`` (see the module's docstring), from one read."""
    return stream_digests(path, progress=progress)[0]


AUTOV1_AT, AUTOV1_SIZE = 0x100000, 0x10000
AUTOV3_MAX_HEADER = 16 * 1024 * 1024
BUFFERS = 4  # chunks in flight between the reader and the slowest hashing thread


def autov3_start(head: bytes) -> int:
    """Where Civitai's AutoV3 starts hashing, from the file's first 8 bytes."""
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else AUTOV3_MAX_HEADER
    return 8 + n if n < AUTOV3_MAX_HEADER else 8


Ranges = Sequence[tuple[int, int]]


def stream_digests(path: str, ranges: Sequence[Ranges] = (),
                   progress: Progress | None = None, remember: bool = True
                   ) -> tuple[dict[str, str], list[str]]:
    """The file hashes of ``path`` and, for each entry of ``ranges`` (byte ranges of the file),
    the BLAKE3 of those bytes in turn; all from one read of the file. Raises ``FormatError``
    if the file changed while it was read, or if ``path`` is no regular file (opening a
    named pipe would wait for a writer forever).

    ``remember``: whether the SHA-256 goes into the cache (``cached_sha256``). ``ckpt batch``
    says no: the cache is one JSON file rewritten whole on each hash, so a store of millions
    of files would rewrite an ever-growing file once per file (and its children would race
    on it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FormatError(path_problem(path, exc), path) from None
    if not stat.S_ISREG(mode):
        raise FormatError("is a directory, not a file" if stat.S_ISDIR(mode) else
                          "is not a regular file (a pipe, socket or device); nothing to hash",
                          path)
    identity = _identity(path)
    size = identity[1][0]
    whole, after_header, b3 = hashlib.sha256(), hashlib.sha256(), blake3.blake3()
    crc = [0]
    window = bytearray()
    with open(path, "rb", buffering=0) as f:
        skip = autov3_start(f.read(8))
        f.seek(0)
        tensors = _RangeDigests(ranges)

        def rest(view: memoryview, position: int) -> None:
            b3.update(view)
            crc[0] = zlib.crc32(view, crc[0])
            end = position + len(view)
            if position < AUTOV1_AT + AUTOV1_SIZE and end > AUTOV1_AT:
                stop = AUTOV1_AT + AUTOV1_SIZE - position
                window.extend(view[max(0, AUTOV1_AT - position):stop])

        def autov3(view: memoryview, position: int) -> None:
            if position + len(view) > skip:
                after_header.update(view[max(0, skip - position):])

        _read_into_lanes(f, (lambda view, _: whole.update(view), autov3, rest, tensors.feed),
                         size, progress)
    if _identity(path) != identity or not tensors.complete():
        raise FormatError("the file changed while it was being hashed; hash it again", path)
    sha = whole.hexdigest()
    if remember:
        _remember(identity, sha)
    hashes = {"sha256": sha, "autov1": hashlib.sha256(window).hexdigest()[:8],
              "autov2": sha[:10], "autov3": after_header.hexdigest(),
              "crc32": crc[0].to_bytes(4, "little").hex(), "blake3": b3.hexdigest()}
    return hashes, tensors.digests


class _RangeDigests:
    """BLAKE3 of given byte ranges of a file, fed the file's chunks in order. A digest's hasher
    exists only while its ranges are being read, so that a header of many tensors does not
    hold a hasher for each. A range that the file holds before the one that precedes it in
    its digest (diffusers' ``to_k`` before ``to_q``, which a fused ``qkv`` takes in the order
    q, k, v) is kept in memory until its turn: at most a tensor's bytes."""

    def __init__(self, ranges: Sequence[Ranges]):
        self.digests: list[str] = [""] * len(ranges)
        self._left = [0] * len(ranges)  # ranges not yet hashed, per digest
        self._turn = [0] * len(ranges)  # which of its ranges a digest takes next
        pieces = []
        for index, spans in enumerate(ranges):
            spans = [(a, b) for a, b in spans if b > a]
            if not spans:
                self.digests[index] = blake3.blake3().hexdigest()
            self._left[index] = len(spans)
            pieces += [(a, b, index, order) for order, (a, b) in enumerate(spans)]
        pieces.sort()
        self._pieces = pieces
        self._next = 0
        self._active: list[tuple[int, int, int, int]] = []
        self._hashers: dict[int, blake3.blake3] = {}
        self._early: dict[tuple[int, int], bytearray] = {}  # (digest, order) -> bytes held
        self._held_done: set[tuple[int, int]] = set()

    def feed(self, view: memoryview, position: int) -> None:
        end = position + len(view)
        pieces = self._pieces
        while self._next < len(pieces) and pieces[self._next][0] < end:
            self._active.append(pieces[self._next])
            self._next += 1
        still = []
        for piece in self._active:
            start, stop, index, order = piece
            data = view[max(start, position) - position:min(stop, end) - position]
            if order == self._turn[index]:
                self._hasher(index).update(data)
            else:
                self._early.setdefault((index, order), bytearray()).extend(data)
            if stop > end:
                still.append(piece)
            elif order == self._turn[index]:
                self._done(index)
            else:
                self._held_done.add((index, order))
        self._active = still

    def _hasher(self, index: int) -> blake3.blake3:
        hasher = self._hashers.get(index)
        if hasher is None:
            hasher = self._hashers[index] = blake3.blake3()
        return hasher

    def _done(self, index: int) -> None:
        """The range whose turn it was is hashed: on to the next, and any held ones due."""
        while True:
            self._turn[index] += 1
            self._left[index] -= 1
            if not self._left[index]:
                self.digests[index] = self._hashers.pop(index).hexdigest()
                return
            key = (index, self._turn[index])
            held = self._early.pop(key, None)
            if held is not None:
                self._hasher(index).update(held)
            if key not in self._held_done:
                return  # its turn has come but its bytes are still to be read
            self._held_done.discard(key)

    def complete(self) -> bool:
        return not any(self._left)


def _read_into_lanes(f, lanes: Sequence[Callable[[memoryview, int], None]], size: int,
                     progress: Progress | None) -> None:
    """Reads ``f`` to its end in ``CHUNK``-sized pieces and hands each piece, with its offset,
    to every lane, each on a thread of its own that takes the pieces in order; a buffer is
    read into again once every lane is done with it. An error in a lane is raised here."""
    chunk = max(1, min(CHUNK, size))
    if progress:
        progress.start(size, 1)
    if size <= chunk:  # one piece: threads would cost more than they save
        data = memoryview(f.read())
        for lane in lanes:
            lane(data, 0)
        if progress:
            progress.update(len(data), 1)
        return
    count = min(BUFFERS, -(-size // chunk))
    buffers = [bytearray(chunk) for _ in range(count)]
    free: queue.Queue[int] = queue.Queue()
    for i in range(count):
        free.put(i)
    users = [0] * count
    lock = threading.Lock()
    errors: list[BaseException] = []

    def release(i: int) -> None:
        with lock:
            users[i] -= 1
            if not users[i]:
                free.put(i)

    def run(lane, inbox: queue.SimpleQueue) -> None:
        while (item := inbox.get()) is not None:
            i, view, position = item
            try:
                if not errors:
                    lane(view, position)
            except BaseException as exc:  # handed to the reading thread, which raises it
                errors.append(exc)
            finally:
                release(i)

    inboxes = [queue.SimpleQueue() for _ in lanes]
    threads = [threading.Thread(target=run, args=pair, daemon=True, name="ckptkit-hash")
               for pair in zip(lanes, inboxes, strict=True)]
    for t in threads:
        t.start()
    position = 0
    try:
        while not errors:
            i = free.get()
            n = f.readinto(buffers[i])
            if not n:
                break
            users[i] = len(lanes)
            view = memoryview(buffers[i])[:n]
            for inbox in inboxes:
                inbox.put((i, view, position))
            position += n
            if progress:
                progress.update(n, 0)
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    if progress:
        progress.update(0, 1)


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
    while it was hashed then no longer matches); at once, or with the others at the end of
    a ``remembered_together`` block."""
    if _together is not None:
        _together.append((identity, sha))
    else:
        _remember_all([(identity, sha)])


def _remember_all(entries: list[tuple[tuple[str, list[int]], str]]) -> None:
    """Writes ``entries`` into the cache file (read, updated, replaced: one write for them
    all); a cache that cannot be written is only a missed shortcut."""
    if not entries:
        return
    try:
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        data = _load_cache()
        for (name, stat), sha in entries:
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


_together: list | None = None  # the hashes a remembered_together block holds back


@contextlib.contextmanager
def remembered_together() -> Iterator[None]:
    """Hashes computed inside are written to the cache once, when the block ends (also by an
    error or an interrupt), not after each file: the cache file is rewritten whole on every
    write, so a library scan of 10,000 files took 0.5 s a file once the cache held them all."""
    global _together
    if _together is not None:  # nested: the outer block writes them
        yield
        return
    _together = []
    try:
        yield
    finally:
        entries, _together = _together, None
        _remember_all(entries)


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
