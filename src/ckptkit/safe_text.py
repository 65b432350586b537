"""Text that came from a file, made safe to print on a terminal or to put in JSON.

A file can put anything in the strings ckptkit reports: a pickle's global names, a ZIP member's
name, the file's own name. Printed as-is, an escape sequence in one of them can move the cursor,
erase the lines above and draw a fake verdict (``\\x1b[2A\\r\\x1b[J SAFE ...``). ``printable``
writes every character that is not printable as an escape of plain ASCII characters, so the
terminal shows the sequence instead of obeying it. ``json_safe`` leaves control characters to
``json.dumps`` (which escapes them) and only replaces what strict JSON readers refuse: lone
surrogates, which is how Python hands over file names that are not valid UTF-8. ``json_dumps``
is the JSON a command prints: ``json.dumps`` escapes only the C0 controls, so it also writes
every other character that ``printable`` escapes (C1 controls such as CSI U+009B, bidi
overrides such as U+202E) as a ``\\uNNNN`` escape, which any JSON reader decodes back.
"""

from __future__ import annotations

import json
import math
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (os.fsdecode)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character that ``str.isprintable`` rejects written as an escape:
    ``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. That covers the C0 and
    C1 control characters (ESC, CSI, BEL, backspace, carriage return...), DEL, the bidirectional
    overrides and other invisible format characters, line and paragraph separators, and lone
    surrogates. A byte of a file name that is not UTF-8 (``os.fsdecode`` hands it over as a
    surrogate from U+DC80 to U+DCFF) is shown as ``\\xNN``, the byte itself. The ordinary space
    is kept. Backslashes are not doubled: the result is for reading, not for decoding back."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds lone surrogates (a file name that is not valid UTF-8)."""
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def json_text(text: str) -> str:
    """``text`` with its lone surrogates replaced, so that it encodes as UTF-8 and strict JSON
    readers accept it: a byte of a file name that is not UTF-8 (U+DC80 to U+DCFF, from
    ``os.fsdecode``) becomes the four characters ``\\xNN``, any other lone surrogate
    ``\\udNNN``. Everything else is kept; ``json.dumps`` escapes control characters itself."""
    if not has_surrogates(text):
        return text
    return "".join(_escape(ch) if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


def json_safe(value: Any) -> Any:
    """``value`` (a report: dicts, lists, tuples, strings, numbers) as strict JSON takes it:
    ``json_text`` applied to every string, keys included, and non-finite floats written as
    the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has no such numbers), so that
    ``json.dumps(..., allow_nan=False)`` accepts it and writes valid UTF-8. Tuples become
    lists; anything else is returned as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return json_text(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """``value`` (a report) as one line of strict JSON, safe to print: ``json_safe`` applied,
    non-ASCII text kept readable, and every character ``printable`` would escape written as
    a JSON ``\\uNNNN`` escape (a surrogate pair beyond U+FFFF), so that a terminal shows a
    C1 control or a bidi override in a name instead of obeying it. Decoding gives the same
    value back."""
    text = json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
