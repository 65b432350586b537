"""The object a ``--json`` run prints on stdout when it fails.

The error line itself goes to stderr (``main`` prints it); a script that reads only stdout
still gets one JSON object saying why, with the same words.
"""

from __future__ import annotations

from ..errors import CkptError
from ..safe_text import json_dumps


def error_reason(exc: BaseException) -> str:
    """What the error line on stderr says, without its ``ckpt: error:`` prefix."""
    if isinstance(exc, CkptError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; no output was written"
    return f"internal error: {type(exc).__name__}: {exc}"


def print_json_error(exc: BaseException, **fields) -> None:
    """Print ``fields`` (the run's input and output names) with the ``error`` on stdout."""
    print(json_dumps({**fields, "error": error_reason(exc)}))
