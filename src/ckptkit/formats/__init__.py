"""Every checkpoint file format, opened as a lazy mapping from key to tensor.

``open_checkpoint`` decides the format by magic bytes, parses only headers (or pickles, with
the restricted interpreter), and returns a ``Checkpoint`` whose tensors are read on demand.
Nothing here imports torch until a tensor is materialised.
"""

from __future__ import annotations

import os

from ..errors import CkptError, FormatError, UnsafeFileError
from .checkpoint import Checkpoint, LazyTensor
from .gguf import open_gguf
from .pickle_vm import Finding
from .quantized import QuantizedTensor
from .safetensors import open_safetensors
from .sniff import GGUF, SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format, extension_note
from .source import Source
from .torch_pickle import (
    open_torch_legacy,
    open_torch_zip,
    refuse_what_torch_load_runs,
    refuse_what_torch_zip_runs,
)
from .weight_quant import recognise

_OPENERS = {
    SAFETENSORS: open_safetensors,
    TORCH_ZIP: open_torch_zip,
    TORCH_LEGACY: open_torch_legacy,
    GGUF: open_gguf,
}

__all__ = ["Checkpoint", "LazyTensor", "QuantizedTensor", "detect_format", "open_checkpoint"]


def open_checkpoint(path: str | os.PathLike[str], findings: list[Finding] | None = None, *,
                    detected: str | FormatError | None = None) -> Checkpoint:
    """Opens ``path`` lazily; raises a ``CkptError`` subclass naming the file and the problem.

    With a ``findings`` list, every refused global of a pickle is recorded there (not just the
    first) before the file is refused: what ``ckpt scan`` reports.

    A file is judged by every way ``torch.load`` and ``pickle.load`` would read it, not only
    by the format found: one that is not a ZIP and that, read as a pickle from its first byte,
    names code is refused as unsafe, whether ckptkit read it as safetensors (a polyglot: see
    ``open_safetensors``), could not read it at all, or refused it as a broken legacy
    checkpoint (see ``refuse_what_torch_load_runs``); so is a ZIP ckptkit refused as broken
    that torch's laxer ZIP reader would read, for what its pickles name (a re-zipped file:
    see ``refuse_what_torch_zip_runs``).

    ``detected``: what ``detect_format(path)`` returned or raised, where the caller asked it
    already (``ckpt scan`` reports the format too): the file's start is not read again.
    """
    path = os.fspath(path)
    try:
        if isinstance(detected, FormatError):
            raise detected
        fmt = detected or detect_format(path)
    except UnsafeFileError:
        raise
    except FormatError as exc:
        if os.path.isfile(path):  # not a folder or a device: torch.load would read it
            try:
                with Source(path) as source:
                    refuse_what_torch_load_runs(source, findings, exc.reason)
            except OSError:
                pass  # unreadable: the error at hand says so
        raise
    try:
        source = Source(path)
    except OSError as exc:
        raise CkptError(f"cannot open the file ({exc.strerror})", path) from None
    try:
        checkpoint = _OPENERS[fmt](source, findings)
        if fmt != GGUF:
            recognise(checkpoint)  # fp8-scaled and bitsandbytes weights, read as values
    except CkptError as exc:
        refused = bool(findings) or isinstance(exc, UnsafeFileError)
        try:
            if fmt == TORCH_ZIP:  # torch.load reads a ZIP as a ZIP, never as a pickle
                if not refused:
                    refuse_what_torch_zip_runs(source, findings, exc.reason)
            else:
                refuse_what_torch_load_runs(source, findings, exc.reason, refused=refused)
        finally:
            source.close()
        if exc.path is None:
            raise type(exc)(exc.reason, path) from None
        raise
    except BaseException:
        source.close()
        raise
    note = extension_note(path, fmt)
    if note:
        checkpoint.notes.insert(0, note)
    return checkpoint
