"""Every checkpoint file format, opened as a lazy mapping from key to tensor.

``open_checkpoint`` decides the format by magic bytes, parses only headers (or pickles, with
the restricted interpreter), and returns a ``Checkpoint`` whose tensors are read on demand.
Nothing here imports torch until a tensor is materialised.
"""

from __future__ import annotations

import os

from ..errors import CkptError, FormatError, UnsafeFileError
from .checkpoint import Checkpoint, LazyTensor
from .pickle_vm import REACHING, Finding
from .safetensors import open_safetensors
from .sniff import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format, extension_note
from .source import Source
from .torch_pickle import open_torch_legacy, open_torch_zip, torch_load_findings

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

    A file is judged by every way ``torch.load`` and ``pickle.load`` would read it, not only
    by the format found: one that is not a ZIP and that, read as a pickle from its first byte,
    names code is refused as unsafe, whether ckptkit read it as safetensors (a polyglot),
    could not read it at all, or refused it as a broken legacy checkpoint (see
    ``torch_load_findings``).
    """
    path = os.fspath(path)
    try:
        fmt = detect_format(path)
    except UnsafeFileError:
        raise
    except FormatError as exc:
        _refuse_what_torch_load_runs(path, None, findings, exc.reason)
        raise
    try:
        source = Source(path)
    except OSError as exc:
        raise CkptError(f"cannot open the file ({exc.strerror})", path) from None
    try:
        checkpoint = _OPENERS[fmt](source, findings)
        if fmt == SAFETENSORS:
            _refuse_what_torch_load_runs(path, source, findings,
                                         "a valid safetensors file")
    except CkptError as exc:
        try:
            if fmt != TORCH_ZIP:
                _refuse_what_torch_load_runs(
                    path, source, findings, exc.reason,
                    refused=bool(findings) or isinstance(exc, UnsafeFileError))
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


def _refuse_what_torch_load_runs(path: str, source: Source | None,
                                 findings: list[Finding] | None, what: str,
                                 refused: bool = False) -> None:
    """Raises ``UnsafeFileError`` if torch.load or pickle.load would meet code in the file
    (``what`` says what ckptkit made of it); its findings go to ``findings``, after those
    ckptkit's own reading found (the same opcode is not named twice). A file ckptkit already
    ``refused`` as unsafe is only searched further, for a scan to name everything in it."""
    own = source is None
    try:
        if own and not os.path.isfile(path):
            return  # a folder or a device: not something torch.load reads
        source = source or Source(path)
        try:
            found = torch_load_findings(source)
        finally:
            if own:
                source.close()
    except OSError:
        return  # unreadable: the error at hand says so
    reaching = [f for f in found if f.kind in REACHING]
    if not reaching:
        return
    if findings is not None:
        known = {(f.kind, f.name, f.offset) for f in findings}
        findings.extend(f for f in found if (f.kind, f.name, f.offset) not in known)
    if refused:
        return
    names = sorted({f.name for f in reaching if f.kind != "limit"})
    limits = [f.name for f in reaching if f.kind == "limit"]
    said = []
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        said.append(f"names {shown}: loading it that way would run code")
    if limits:
        said.append(f"goes where this reader does not follow ({limits[0]}): not verified")
    raise UnsafeFileError(f"{what}, but torch.load and pickle.load read it as a pickle from "
                          f"its first byte, which {'; and '.join(said)}", path)
