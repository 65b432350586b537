"""Every checkpoint file format, opened as a lazy mapping from key to tensor.

``open_checkpoint`` decides the format by magic bytes, parses only headers (or pickles, with
the restricted interpreter), and returns a ``Checkpoint`` whose tensors are read on demand.
Nothing here imports torch until a tensor is materialised.
"""

from __future__ import annotations

import os

from ..errors import CkptError
from .checkpoint import Checkpoint, LazyTensor
from .pickle_vm import Finding
from .safetensors import open_safetensors
from .sniff import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format, extension_note
from .source import Source
from .torch_pickle import open_torch_legacy, open_torch_zip

_OPENERS = {
    SAFETENSORS: open_safetensors,
    TORCH_ZIP: open_torch_zip,
    TORCH_LEGACY: open_torch_legacy,
}

__all__ = ["Checkpoint", "LazyTensor", "detect_format", "open_checkpoint"]


def open_checkpoint(path: str | os.PathLike[str],
                    findings: list[Finding] | None = None) -> Checkpoint:
    """Opens ``path`` lazily; raises a ``CkptError`` subclass naming the file and the problem.

    With a ``findings`` list, every refused global of a pickle is recorded there (not just the
    first) before the file is refused: what ``ckpt scan`` reports.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    try:
        source = Source(path)
    except OSError as exc:
        raise CkptError(f"cannot open the file ({exc.strerror})", path) from None
    try:
        checkpoint = _OPENERS[fmt](source, findings)
    except CkptError as exc:
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
