"""``scan``: a verdict for every file of a model folder, from the same parse that loads it.

The verdict comes from opening the file with the reader every other command uses, in the
mode that records every refused global instead of stopping at the first: there is no second,
lighter parser whose view of the file could differ from the loader's. ``safe`` means the file
opened and every tensor record was checked; ``unsafe`` means it names code, uses opcodes or
archive tricks a data file never needs; ``error`` means it could not be read as a checkpoint.
Files that are not model files at all (a config, a preview image) are ``skipped`` unless
their bytes would be run by ``torch.load``'s legacy path, which unpickles any file it is given.
A folder that cannot be listed, or a path given that does not exist, is an ``error`` too: a scan
never passes because it did not look (see ``walk``).
"""

from __future__ import annotations

import os
import pickletools
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CkptError, FormatError, UnsafeFileError
from ..formats import detect_format, open_checkpoint
from ..formats.pickle_vm import Finding, PickleVM, RefusedGlobals, why_refused
from ..formats.sniff import EXTENSIONS, path_problem
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
        stopped = refused = None
        try:
            PickleVM(head, 0, find_global=find_global, persistent_load=None,
                     where="file", findings=findings).run()
        except CkptError as exc:
            stopped = exc.reason
            refused = isinstance(exc, UnsafeFileError)
        if refused and not findings:
            findings = _named_globals(head)
        findings = [f for f in findings if f.kind == "structure" or _importable(f.name)]
        if findings:
            reasons = [_finding_reason(f) for f in findings]
            if stopped:
                reasons.append(_reason("structure", f"parsing stopped: {stopped}"))
            return ScanResult(path, UNSAFE, "pickle", reasons=reasons)
        if refused and _declares_pickle(head):
            # It declares a pickle protocol, but stopped on something the reader refuses:
            # torch.load would unpickle it. Not verifiable is not safe.
            return ScanResult(path, UNSAFE, "pickle", reasons=[_reason(
                "structure", f"{stopped}; a pickle this scanner cannot verify, which "
                "torch.load would run")])
    if os.path.splitext(path)[1].lower() in _MODEL_EXTENSIONS:
        return ScanResult(path, ERROR, reasons=[_reason("read", reason)])
    return ScanResult(path, SKIPPED, reasons=[_reason("format", reason)])


def _named_globals(head: bytes) -> list[Finding]:
    """The globals outside the allow-list that a pickle names (GLOBAL, INST) before it would
    stop, for pickles the reader refuses before its first global (older protocols' text
    opcodes, which torch.save never writes, ahead of a GLOBAL). ``pickletools.genops`` decodes
    each opcode and its argument as ``pickle.load`` reads them and runs nothing; where it stops,
    ``pickle.load`` stops too."""
    found = []
    try:
        for op, arg, pos in pickletools.genops(head):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                try:
                    find_global(module, name)
                except UnsafeFileError:
                    found.append(Finding("global", f"{module}.{name}", "file", pos or 0,
                                         why_refused(module)))
            elif op.name == "STOP":
                break
    except Exception:  # any malformed opcode ends the pickle for pickle.load too
        pass
    return found


def _importable(dotted: str) -> bool:
    """Whether a global's name could import anything: dotted identifiers. A text file that
    happens to open with ``c`` (``comfyui:`` in ComfyUI's ``extra_model_paths.yaml``) reads as a
    GLOBAL of ``omfyui:``, which no import can find, so pickle.load stops there harmlessly."""
    return all(part.isidentifier() for part in dotted.removesuffix("()").split("."))


def _declares_pickle(head: bytes) -> bool:
    """Whether the bytes open with a pickle's PROTO opcode and a protocol pickle knows (2 to
    5): what pickle.dumps and torch.save write, and not what other files begin with."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


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
    results = list(results)
    verdicts = {r.verdict for r in results}
    if UNSAFE in verdicts:
        return UnsafeFileError.exit_code
    if any(reason["kind"] == "internal" for r in results for reason in r.reasons):
        return 70
    return FormatError.exit_code if ERROR in verdicts else 0
