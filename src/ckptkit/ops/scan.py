"""``scan``: a verdict for every file of a model folder, from the same parse that loads it.

The verdict comes from opening the file with the reader every other command uses, in the
mode that records every refused global instead of stopping at the first: there is no second,
lighter parser whose view of the file could differ from the loader's. ``safe`` means the file
opened and every tensor record was checked; ``unsafe`` means it names code, uses opcodes or
archive tricks a data file never needs; ``error`` means it could not be read as a checkpoint.
Files that are not model files at all (a config, a preview image) are ``skipped`` unless
their bytes would be run by ``torch.load``'s legacy path, which unpickles any file it is given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CkptError, UnsafeFileError
from ..formats import detect_format, open_checkpoint
from ..formats.pickle_vm import Finding, PickleVM, RefusedGlobals
from ..formats.sniff import EXTENSIONS
from ..formats.torch_globals import find_global
from ..formats.torch_zip import verify_crc

SAFE, UNSAFE, ERROR, SKIPPED = "safe", "unsafe", "error", "skipped"
_MODEL_EXTENSIONS = {e for exts in EXTENSIONS.values() for e in exts} | {".gguf"}
_PROBE_BYTES = 1 << 20


@dataclass
class ScanResult:
    path: str
    verdict: str
    format: str | None = None
    tensors: int | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finding_reason(f: Finding) -> dict[str, Any]:
    return {"kind": f.kind, "message": f"{f.kind} {f.name}", "where": f.where,
            "offset": f.offset, "why": f.why}


def _reason(kind: str, message: str) -> dict[str, Any]:
    return {"kind": kind, "message": message, "where": None, "offset": None, "why": None}


def scan_file(path: str, verify_data: bool = False) -> ScanResult:
    """Scans one file; never raises for anything the file contains."""
    try:
        return _scan(path, verify_data)
    except CkptError as exc:
        return ScanResult(path, ERROR, reasons=[_reason("read", exc.reason)])
    except OSError as exc:
        return ScanResult(path, ERROR, reasons=[_reason("read", exc.strerror or str(exc))])
    except Exception as exc:
        return ScanResult(path, ERROR, reasons=[_reason(
            "internal", f"ckptkit failed on this file ({type(exc).__name__}: {exc}); "
                        "please report it")])


def _scan(path: str, verify_data: bool) -> ScanResult:
    try:
        fmt = detect_format(path)
    except UnsafeFileError as exc:
        return ScanResult(path, UNSAFE, reasons=[_reason("format", exc.reason)])
    except CkptError as exc:
        return _unrecognised(path, exc.reason)
    findings: list[Finding] = []
    try:
        checkpoint = open_checkpoint(path, findings)
    except CkptError as exc:
        reasons = [_finding_reason(f) for f in findings]
        unsafe = bool(findings) or isinstance(exc, UnsafeFileError)
        if not isinstance(exc, RefusedGlobals):  # that one only sums up the findings
            reasons.append(_reason("structure" if unsafe else "read", exc.reason))
        return ScanResult(path, UNSAFE if unsafe else ERROR, fmt, reasons=reasons)
    with checkpoint:
        if verify_data and checkpoint.container is not None:
            for member in checkpoint.container.members.values():
                verify_crc(checkpoint.source, member)
        notes = [_reason("note", n) for n in checkpoint.notes]
        return ScanResult(path, SAFE, fmt, len(checkpoint), notes)


def _unrecognised(path: str, reason: str) -> ScanResult:
    """A file that is no checkpoint format: probe it as a bare pickle, since ``torch.load``
    would unpickle it; otherwise skip it, or call it an error if it is named like a model."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
        findings: list[Finding] = []
        stopped = None
        try:
            PickleVM(head, 0, find_global=find_global, persistent_load=None,
                     where="file", findings=findings).run()
        except CkptError as exc:
            stopped = exc.reason
        if findings:
            reasons = [_finding_reason(f) for f in findings]
            if stopped:
                reasons.append(_reason("structure", f"parsing stopped: {stopped}"))
            return ScanResult(path, UNSAFE, "pickle", reasons=reasons)
    if os.path.splitext(path)[1].lower() in _MODEL_EXTENSIONS:
        return ScanResult(path, ERROR, reasons=[_reason("read", reason)])
    return ScanResult(path, SKIPPED, reasons=[_reason("format", reason)])


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Every regular file under ``paths`` (directories recursively, in sorted order), whatever
    its extension; symbolic links to folders are not followed, so loops cannot hang a scan."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name)
        else:
            yield path


def exit_code(results: Iterable[ScanResult]) -> int:
    """0 when every file is safe (or skipped), 1 when any is unsafe, else 2 on errors."""
    verdicts = {r.verdict for r in results}
    if UNSAFE in verdicts:
        return 1
    return 2 if ERROR in verdicts else 0
