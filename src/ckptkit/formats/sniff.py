"""Decides what a file is from its first bytes, never from its name.

A ``.ckpt`` renamed ``.safetensors``, an HTML error page saved as ``model.safetensors``, a Git
LFS pointer, an empty or truncated download: each is recognised here and named in the error,
instead of surfacing later as a baffling ``HeaderTooLarge``.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile

from ..errors import FormatError, UnsafeFileError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
GGUF = "gguf"

# What each format is usually called; a mismatch is worth a warning, never a refusal.
EXTENSIONS = {
    SAFETENSORS: (".safetensors", ".sft"),
    TORCH_ZIP: (".ckpt", ".pt", ".pth", ".bin"),
    TORCH_LEGACY: (".ckpt", ".pt", ".pth", ".bin"),
    GGUF: (".gguf",),
}
# The names a model file goes by: in a folder, a file named so is reported even when its
# content is no checkpoint (an HTML page, a Git LFS pointer, an empty download), since that is
# what its user needs to know.
MODEL_EXTENSIONS = frozenset({e for exts in EXTENSIONS.values() for e in exts})
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SNIFF = 512


def detect_format(path: str) -> str:
    """The format of ``path`` by content, or a ``FormatError`` that says what the file is."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise FormatError(path_problem(path, exc), path) from None
    if stat.S_ISDIR(info.st_mode):
        raise FormatError("is a directory, not a checkpoint file", path)
    if not stat.S_ISREG(info.st_mode):  # its size says nothing, and reading it may block
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "a device")
        raise FormatError(f"is {kind}, not a regular file; ckptkit reads checkpoints from "
                          "regular files", path)
    size = info.st_size
    if size == 0:
        raise FormatError("the file is empty (a failed download?)", path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
            f.seek(max(0, size - 22))
            tail = f.read(22)
    except OSError as exc:
        raise FormatError(f"cannot read the file ({exc.strerror})", path) from None
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if opens_as_tar(head) or head[257:262] == b"ustar":
        raise UnsafeFileError("this is a tar archive, which torch.load reads as the torch "
                              "format of before 2018, unpickling the members it names "
                              "('storages', 'tensors', 'pickle'): refused, whatever else the "
                              "file looks like; re-save it with a current torch", path)
    if head.startswith(_LEGACY_PREFIX):
        return TORCH_LEGACY
    if head.startswith(b"GGUF"):
        return GGUF  # the reader explains a header that does not fit the file
    if head[8:9] == b"{":
        return SAFETENSORS  # the reader explains a header that does not fit the file
    try:
        what = _describe_other(head, tail, size)
    except UnsafeFileError as exc:
        raise UnsafeFileError(exc.reason, path) from None
    raise FormatError(what, path)


def opens_as_tar(head: bytes) -> bool:
    """Whether Python's ``tarfile``, which torch.load tries before anything else on a file that
    is not a ZIP, reads the first 512 bytes as a tar header. Old-style headers carry no
    ``ustar`` marker: only a checksum says they are one, and a pickle or a safetensors header
    can be made to carry a valid one (a polyglot)."""
    try:
        tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError):
        return False
    return True


def path_problem(path: str, exc: OSError) -> str:
    """Why ``os.stat(path)`` failed, in words: a symbolic link loop or a link to nothing is
    named as such rather than reported as a missing file."""
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop (following the links leads back to them), not a file"
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return "a symbolic link to a file or folder that does not exist"
        return "no such file or folder"
    return f"cannot read the file ({exc.strerror or exc})"


def _describe_other(head: bytes, tail: bytes, size: int) -> str:
    """What the file is instead of a checkpoint; raises for the kinds that are hostile."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return ("this is an HTML page (an error or login page saved by a failed download), "
                "not model weights")
    if head.startswith(b"version https://git-lfs"):
        return ("this is a Git LFS pointer, not the weights: fetch the real file "
                "(git lfs pull)")
    if text.startswith((b"{", b"[")):
        return "this is a JSON text file, not model weights"
    if head.startswith(b"\x80"):
        return "this is a pickle but not one torch.save writes (not a torch checkpoint)"
    if head.startswith(b"PK"):
        return "this is a ZIP file that does not start with a member (not a torch checkpoint)"
    if tail.startswith(b"PK\x05\x06"):
        raise UnsafeFileError("a ZIP archive with data before its first member (a polyglot "
                              "that different readers see differently)")
    if size < 8:
        return f"the file has only {size} bytes: truncated, or not a checkpoint"
    return ("the file is not a safetensors, GGUF or PyTorch checkpoint (unrecognised first "
            "bytes)")


def extension_note(path: str, fmt: str) -> str | None:
    """A warning when the file's name suggests another format than its content."""
    ext = os.path.splitext(path)[1].lower()
    known = {e for exts in EXTENSIONS.values() for e in exts}
    if ext in known and ext not in EXTENSIONS[fmt]:
        shown = {SAFETENSORS: "safetensors", GGUF: "GGUF"}.get(fmt, "PyTorch pickle")
        return f"the file is named {ext} but holds a {shown} checkpoint; it was read as what it is"
    return None
