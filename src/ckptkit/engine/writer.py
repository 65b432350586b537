"""The streaming safetensors writer: header from the plan, then one tensor at a time.

The header (names, dtypes, shapes, offsets) is computed from the planned outputs before any
tensor is produced, so each tensor can be written the moment it exists and released straight
after: peak memory is a few tensors (the one written and those produced ahead), whatever the
model's size. Every byte goes to the file through ``appender.Appender``: computed tensors
straight into its reused buffers (``produce_into``), the others copied in, pass-through
tensors (``CopyRange``) read from their input into it; a thread writes the buffers out
bypassing the page cache. The file is written through ``AtomicOutput`` and its header is
checked with the reader before it takes the target's name.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import CkptError, OutputError, UsageError
from ..formats.dtypes import DType, from_torch_tensor, torch_dtype
from ..formats.safetensors import METADATA_KEY, open_safetensors
from ..formats.source import Source
from .appender import NO_ROOM, Appender
from .atomic import AtomicOutput

PREFETCH = 2  # tensors produced ahead of the one being written


class Progress(Protocol):
    """What long jobs report to: totals once planned, then increments as work is done."""

    def start(self, total_bytes: int, total_items: int) -> None: ...

    def update(self, nbytes: int, items: int = 0) -> None: ...


@dataclass(frozen=True)
class CopyRange:
    """Bytes to copy unchanged from an input file: what a pass-through tensor produces."""

    source: Source
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Zeros:
    """A tensor of zero bytes left as a hole in the file (sparse samples for header tests)."""

    nbytes: int


@dataclass(frozen=True)
class Deferred:
    """A metadata value known only once the data is written (the SHA-256 of inputs hashed
    while they are read): the header holds ``placeholder`` and is patched in place with
    ``resolve()``, which must give a value no longer once encoded (the header is padded with
    spaces, which JSON allows), before the file takes its name. ``cancel`` stops the work
    behind it when the write fails."""

    placeholder: str
    resolve: Callable[[], str]
    cancel: Callable[[], None] = lambda: None


@dataclass
class Planned:
    """One output tensor: its key, dtype and shape, and how to produce its data when due.

    ``produce`` returns a torch tensor of exactly this dtype and shape, a bytes-like object
    of exactly ``nbytes``, a ``CopyRange`` (or a tuple of them, copied in turn) or ``Zeros``.
    ``produce_into``, where given, fills a torch tensor of this dtype and shape instead: the
    writer hands it the tensor's place in its write buffer, so computed data needs no
    tensor of its own and no copy.
    """

    key: str
    dtype: DType
    shape: tuple[int, ...]
    produce: Callable[[], Any]
    produce_into: Callable[[Any], None] | None = None

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(math.prod(self.shape))


# Where tensor data starts, and where every tensor whose size is a multiple of it starts:
# CPU kernels take other code paths (and round the last bit otherwise) on unaligned data, so
# ``ops.load`` maps a tensor into a model only when it is aligned, and reads it otherwise.
ALIGNMENT = 64


def aligned_order(planned: Sequence[Planned]) -> list[Planned]:
    """``planned`` with the tensors whose byte size is a multiple of ``ALIGNMENT`` first (in
    their order), then the others: behind a header that ends on an aligned offset, every
    tensor of the first group (all weights of usual widths) starts aligned; safetensors
    allows no gaps between tensors, so the order is the only way to align them."""
    return sorted(planned, key=lambda item: item.nbytes % ALIGNMENT != 0)


def build_header(planned: Sequence[Planned], metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included), padded with spaces so that the data starts
    on an ``ALIGNMENT`` boundary (the format asks for 8)."""
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise OutputError(f"metadata must map strings to strings; {bad[0]!r} does not")
        header[METADATA_KEY] = metadata
    offset = 0
    for item in planned:
        if item.key in header:
            raise OutputError(f"the plan writes key {item.key!r} twice")
        header[item.key] = {"dtype": item.dtype.name, "shape": list(item.shape),
                            "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % ALIGNMENT)
    return len(body).to_bytes(8, "little") + body


def _append_item(data: Appender, item: Planned, produced: Any) -> None:
    if produced is _INTO:
        data.produce(item.nbytes, _into_tensor(item))
        return
    if isinstance(produced, Zeros):
        data.skip(item.nbytes)
        return
    if isinstance(produced, CopyRange):
        produced = (produced,)
    if isinstance(produced, tuple):  # ranges copied one after the other
        total = sum(r.nbytes for r in produced)
        if total != item.nbytes:
            raise AssertionError(f"{item.key}: copy of {total} bytes, planned {item.nbytes}")
        for copy in produced:
            data.copy(copy.source, copy.offset, copy.nbytes)
        return
    if (hasattr(produced, "dtype") and hasattr(produced, "shape")
            and not isinstance(produced, memoryview)):
        if from_torch_tensor(produced) != (item.dtype, item.shape):
            raise AssertionError(f"{item.key}: produced {produced.dtype} "
                                 f"{tuple(produced.shape)}, planned {item.dtype} {item.shape}")
        produced = _tensor_buffer(produced)
    produced = memoryview(produced).cast("B")
    if len(produced) != item.nbytes:
        raise AssertionError(f"{item.key}: produced {len(produced)} bytes, "
                             f"planned {item.nbytes}")
    data.append(produced)


def _into_tensor(item: Planned) -> Callable[[Any], None]:
    """``item.produce_into`` given its bytes as a tensor of its dtype and shape."""
    def fill(flat) -> None:
        item.produce_into(flat.view(torch_dtype(item.dtype))
                          .view(item.dtype.torch_shape(item.shape)))
    return fill


# Names that tell a loader to read something other than safetensors: A1111, ComfyUI,
# diffusers and transformers choose torch.load for these, which fails on safetensors bytes.
_OTHER_FORMATS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".gguf")


def check_safetensors_name(target: str) -> None:
    """Refuses to write safetensors under a name that makes loaders read another format (a
    merge saved as ``x.ckpt`` would fail to load everywhere, with a pickle error)."""
    suffix = os.path.splitext(os.fspath(target))[1].lower()
    if suffix in _OTHER_FORMATS:
        raise UsageError(f"the output is safetensors, but its name ends in {suffix}, which "
                         "makes loaders read it as another format: name it .safetensors",
                         target)


def write_safetensors(target: str, planned: Sequence[Planned],
                      metadata: dict[str, str | Deferred] | None = None, *,
                      inputs: tuple[str, ...] = (), progress: Progress | None = None,
                      fsync: bool = True, batch: OutputBatch | None = None) -> None:
    """Writes ``planned`` to ``target`` atomically, streaming one tensor at a time; with a
    ``batch``, the file is finished (deferred metadata, check, rename) with the others."""
    check_safetensors_name(target)
    metadata = metadata or {}
    planned = aligned_order(planned)
    header = build_header(planned, _placeholders(metadata))
    if progress:
        progress.start(sum(p.nbytes for p in planned), len(planned))
    pending = _Pending(AtomicOutput(target, inputs, fsync=fsync), header, planned, metadata)
    size = len(header) + sum(p.nbytes for p in planned)
    try:
        out = pending.out.__enter__()
        with Appender(out.fd, out.tmp_path, size, target) as data, \
                closing(_prefetched(planned)) as produced:
            data.append(header)
            for item, made in produced:  # closed (worker done) before the buffers are
                _append_item(data, item, made)
                del made  # release the tensor before the next one is made
                if progress:
                    progress.update(item.nbytes, 1)
            data.finish()
    except OSError as exc:
        pending.abandon()
        raise _output_error(exc, target) from None
    except BaseException:
        pending.abandon()
        raise
    if batch is None:
        pending.finish()
    else:
        batch.pending.append(pending)


@dataclass
class _Pending:
    """A written file not yet under its name: what finishing it needs."""

    out: AtomicOutput
    header: bytes
    planned: Sequence[Planned]
    metadata: dict[str, str | Deferred]

    def finish(self) -> None:
        try:
            if any(isinstance(v, Deferred) for v in self.metadata.values()):
                _patch_header(self.out.fd, self.header, self.planned, self.metadata,
                              self.out.target)
            _verify(self.out.tmp_path, self.planned, self.out.target)
            self.out.commit()
        except OSError as exc:
            self.abandon()
            raise _output_error(exc, self.out.target) from None
        except BaseException:
            self.abandon()
            raise
        self.out.__exit__()

    def abandon(self) -> None:
        """Removes the temporary file and stops the work behind deferred values."""
        self.out.__exit__()
        for value in self.metadata.values():
            if isinstance(value, Deferred):
                value.cancel()


class OutputBatch:
    """The files of one operation (a split's components), each written in turn and all
    finished at the end: the inputs' SHA-256 in their metadata are computed while every file
    is written, not while the first one waits. Leaving with an error removes the files not
    yet finished."""

    def __init__(self) -> None:
        self.pending: list[_Pending] = []

    def __enter__(self) -> OutputBatch:
        return self

    def __exit__(self, kind, *_: object) -> None:
        pending, self.pending = self.pending, []
        if kind is not None:
            for item in pending:
                item.abandon()
            return
        for i, item in enumerate(pending):
            try:
                item.finish()
            except BaseException:
                for rest in pending[i + 1:]:
                    rest.abandon()
                raise


# Errors that can only be the output's (its disk, quota, size limit or file system), not an
# input's: said as the output's, in one line, rather than as a bare system message.
_OUTPUT_ERRNOS = {*NO_ROOM, errno.EROFS}


def _output_error(exc: OSError, target: str) -> OSError | OutputError:
    if exc.errno in _OUTPUT_ERRNOS:
        return OutputError(f"cannot write it ({exc.strerror})", target)
    return exc


def _placeholders(metadata: dict[str, str | Deferred]) -> dict[str, str]:
    return {k: v.placeholder if isinstance(v, Deferred) else v for k, v in metadata.items()}


def _patch_header(fd: int, header: bytes, planned: Sequence[Planned],
                  metadata: dict[str, str | Deferred], target: str) -> None:
    """Rewrites the header with the deferred values resolved, padded to the same length so
    that every tensor's offset stays where it was written."""
    final = build_header(planned, {k: v.resolve() if isinstance(v, Deferred) else v
                                   for k, v in metadata.items()})
    if len(final) > len(header):
        raise OutputError("a metadata value grew after the data was written", target)
    body = final[8:] + b" " * (len(header) - len(final))
    os.pwrite(fd, header[:8] + body, 0)


def _tensor_buffer(tensor):
    """The tensor's bytes to write: a view of its memory through numpy (a dependency of
    ckptkit for this and because torch warns without it), no copy."""
    import torch

    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


# What the producing thread hands over for a tensor computed in the write buffer: it is
# produced when its turn comes, there being no buffer place for it earlier.
_INTO = object()


def _made_in_buffer():
    return _INTO


def _prefetched(planned: Sequence[Planned], depth: int = PREFETCH):
    """Yields (item, data), producing the next ``depth`` items in a worker thread while the
    current one is appended: reading, casting and copying overlap (file reads and torch
    release the GIL), and at most ``depth + 1`` tensors are alive at once. Items computed
    in the write buffer yield ``_INTO``."""
    producers = ((item, _made_in_buffer if item.produce_into and item.nbytes else item.produce)
                 for item in planned)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptkit-produce") as pool:
        pending: deque = deque()
        items = iter(producers)
        for item, produce in items:
            pending.append((item, pool.submit(produce)))
            if len(pending) > depth:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(nxt[1])))
            yield item, future.result()


def _verify(path: str, planned: Sequence[Planned], target: str) -> None:
    """Reads the written header back with the strict reader and compares it with the plan."""
    source = Source(path)
    try:
        written = open_safetensors(source)
        same = list(written) == [p.key for p in planned] and all(
            written[p.key].dtype == p.dtype and written[p.key].shape == p.shape
            for p in planned)
    except CkptError as exc:
        raise OutputError(f"the written file does not read back ({exc.reason})", target) from None
    finally:
        source.close()
    if not same:
        raise OutputError("the written file's header does not match what was planned", target)
