"""``scan``: a verdict for every file of a model folder, from the same parse that loads it.

The verdict comes from opening the file with the reader every other command uses, in the
mode that records every refused global instead of stopping at the first: there is no second,
lighter parser whose view of the file could differ from the loader's. ``safe`` means the file
opened and every tensor record was checked; ``unsafe`` means it names code, uses opcodes or
archive tricks a data file never needs; ``error`` means it could not be read as a checkpoint.
Every file is also judged as ``torch.load`` and ``pickle.load`` would read it (``open_checkpoint``
does): a safetensors file that is also a pickle naming code, or a tar archive, is ``unsafe``.
Files that are not model files at all (a config, a preview image) are ``skipped`` unless
their bytes would be run by ``torch.load``'s legacy path, which unpickles any file it is given.
A folder that cannot be listed, or a path given that does not exist, is an ``error`` too: a scan
never passes because it did not look (see ``walk``).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CkptError, FormatError, UnsafeFileError, worse_exit
from ..formats import detect_format, open_checkpoint
from ..formats.pickle_vm import Finding, RefusedGlobals
from ..formats.sniff import MODEL_EXTENSIONS, path_problem
from ..formats.torch_zip import verify_crc

SAFE, UNSAFE, ERROR, SKIPPED = "safe", "unsafe", "error", "skipped"


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
    detected: str | FormatError
    try:
        fmt: str | None = detect_format(path)
        detected = fmt
    except UnsafeFileError as exc:
        return ScanResult(path, UNSAFE, reasons=[_reason("format", exc.reason)])
    except FormatError as exc:  # no checkpoint format: opening it still reads it as
        fmt, detected = None, exc  # torch.load would
    findings: list[Finding] = []
    try:
        checkpoint = open_checkpoint(path, findings, detected=detected)
    except CkptError as exc:
        reasons = [_finding_reason(f) for f in findings]
        unsafe = bool(findings) or isinstance(exc, UnsafeFileError)
        if not isinstance(exc, RefusedGlobals):  # that one only sums up the findings
            reasons.append(_reason("structure" if unsafe else "read", exc.reason))
        if unsafe:
            return ScanResult(path, UNSAFE, fmt or "pickle", reasons=reasons)
        if fmt is None:
            return _unrecognised(path, exc.reason)
        return ScanResult(path, ERROR, fmt, reasons=reasons)
    with checkpoint:
        if verify_data and checkpoint.container is not None:
            for member in checkpoint.container.members.values():
                verify_crc(checkpoint.source, member)
        notes = [_reason("note", n) for n in checkpoint.notes]
        return ScanResult(path, SAFE, fmt, len(checkpoint), notes)


def _unrecognised(path: str, reason: str) -> ScanResult:
    """A file that is no checkpoint format, and that torch.load would not run code from (the
    opening said so): skipped, or an error if it is named like a model file."""
    if os.path.splitext(path)[1].lower() in MODEL_EXTENSIONS:
        return ScanResult(path, ERROR, reasons=[_reason("read", reason)])
    return ScanResult(path, SKIPPED, reasons=[_reason("format", reason)])


def walk(paths: Iterable[str]) -> Iterator[str | ScanResult]:
    """Every file under ``paths`` to scan (a ``str``), whatever its extension, and a finished
    ``ScanResult`` for each path that cannot be walked, in order: folders recursively, the
    files of a folder (sorted) before its subfolders (sorted).

    Nothing is left out silently. A path given that does not exist (or is a symbolic link
    loop, or a link to nothing) is an ``error``; so is a folder that cannot be listed, whose
    files are then unknown. Symbolic links to folders are followed, as model folders often are
    links (A1111, ComfyUI); each real folder is listed once, so a link back to a folder being
    walked (a loop), or to one already walked, is a ``skipped`` entry that names it."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            yield ScanResult(path, ERROR, reasons=[_reason("path", path_problem(path, exc))])
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk_folder(path, info, seen)
        else:
            yield path


def _walk_folder(top: str, info: os.stat_result,
                 seen: dict[tuple[int, int], str]) -> Iterator[str | ScanResult]:
    # Depth first with a stack of its own: no recursion limit on deep trees.
    stack: list[tuple[str, os.stat_result, frozenset[tuple[int, int]]]] = [
        (top, info, frozenset())]
    while stack:
        folder, info, above = stack.pop()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            what = ("a symbolic link loop: it leads back to" if key in above
                    else "the same folder (through a symbolic link) as")
            yield ScanResult(folder, SKIPPED, reasons=[_reason(
                "loop", f"{what} {seen[key]}, which is scanned once; not followed")])
            continue
        seen[key] = folder
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield ScanResult(folder, ERROR, reasons=[_reason(
                "folder", f"cannot list the folder ({exc.strerror or exc}): the files in it "
                          "were not scanned")])
            continue
        subfolders = []
        for entry in entries:
            try:
                sub = entry.stat() if entry.is_dir() else None  # follows symbolic links
            except OSError:
                sub = None  # a link that cannot be followed: scanned as a file, which says why
            if sub is None:
                yield entry.path
            else:
                subfolders.append((entry.path, sub, above | {key}))
        stack.extend(reversed(subfolders))


def exit_code(results: Iterable[ScanResult]) -> int:
    """``ckpt``'s exit code for a scan, from the table every command shares: 4 when any file
    is unsafe (as ``inspect`` exits on one), else 70 when ckptkit failed on a file (a bug),
    else 3 when any path could not be read, else 0. An unsafe file outranks the rest: it is
    what a scan is run to find."""
    return functools.reduce(worse_exit, map(_exit_code, results), 0)


def _exit_code(result: ScanResult) -> int:
    if result.verdict == UNSAFE:
        return UnsafeFileError.exit_code
    if any(reason["kind"] == "internal" for reason in result.reasons):
        return 70
    return FormatError.exit_code if result.verdict == ERROR else 0
