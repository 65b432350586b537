"""How every command reports a failure: one line on stderr, and with ``--json`` one object
on stdout, ``{"error": ..., "exit_code": ..., "path": ...}``, the same keys for every command.

``error`` says what the line on stderr says (without its ``ckpt: error:`` prefix), so that a
script reading only stdout still learns why, in the same words; ``path`` is the file the
error is about (``null`` when it is about none). A command that fails ends in ``main``, which
reports through ``report_failure``; a run over several files (inspect, hash, lora check)
reports each file that failed the same way and goes on with the next.
"""

from __future__ import annotations

import os
import sys

from ..errors import CkptError
from ..safe_text import json_dumps, printable


def exit_code(exc: BaseException) -> int:
    """The exit code a failure ends the run with (the table in ``ckpt --help``)."""
    if isinstance(exc, CkptError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, OSError):  # a closed stdout, a full disk: the output was not written
        return 5
    return 70


def error_reason(exc: BaseException, path: str | None = None) -> str:
    """What the error line on stderr says, without its ``ckpt: error:`` prefix (``path``:
    the file being worked on, for a system error that does not name one)."""
    if isinstance(exc, CkptError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename or path
        return f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc)
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted; no output was written"
    return f"internal error: {type(exc).__name__}: {exc}"


def _error_path(exc: BaseException) -> str | None:
    if isinstance(exc, CkptError):
        return exc.path
    if isinstance(exc, OSError) and exc.filename is not None:
        return os.fsdecode(exc.filename)
    return None


def report_failure(exc: BaseException, as_json: bool, path: str | None = None,
                   code: int | None = None, **detail) -> int:
    """Prints ``exc`` as the one-line error on stderr and, when ``as_json``, as the JSON
    object on stdout (with ``detail``: what one command knows more); returns the exit code
    (``code`` where the caller knows better, as for an input that could not be read).
    ``path``: the file being worked on, when the error may not name it."""
    code = exit_code(exc) if code is None else code
    reason = error_reason(exc, path)
    if code == 70:
        where = f" on {path}" if path else ""
        line = (f"ckpt: {reason}{where} (a bug in ckptkit; CKPT_DEBUG=1 shows the traceback, "
                "please report it)")
    elif code == 130:
        line = f"ckpt: {reason}"
    else:
        line = f"ckpt: error: {reason}"
    print(printable(line), file=sys.stderr)
    if as_json:
        print(json_dumps({"error": reason, "exit_code": code,
                          "path": path or _error_path(exc), **detail}))
    return code
