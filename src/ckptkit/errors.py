"""The errors ckptkit raises on bad input, each a one-sentence message with its own exit code.

Every failure a user can cause (a broken file, a hostile pickle, a wrong option) ends as one
of these, so that the command line can print one line and exit with a distinct code instead
of a traceback.
"""

from __future__ import annotations

import os

# Names whose first sound is not their first letter's: "sd" is read letter by letter (es-dee),
# "unet" as you-net.
_SOUNDS_LIKE_VOWEL = ("sd",)
_SOUNDS_LIKE_CONSONANT = ("unet",)


def a_or_an(word: str) -> str:
    """``word`` after its indefinite article, for messages that name a kind: "an unknown",
    "a vae", "an openclip_h", "an sd1 LoRA", "a unet" (by sound, not by letter; a leading
    bracket, as in "(IA)^3", is not read)."""
    spoken = word.lstrip("([").lower()
    if spoken.startswith(_SOUNDS_LIKE_VOWEL):
        vowel = True
    elif spoken.startswith(_SOUNDS_LIKE_CONSONANT):
        vowel = False
    else:
        vowel = spoken[:1] in tuple("aeiou")
    return ("an " if vowel else "a ") + word


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` (with thousands separators) and ``noun``, in the plural unless ``n`` is 1:
    "1 tensor", "2,048 tensors", "3 entries" (``plural`` where it is not ``noun`` + s)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


# Which exit code a run over several files ends with: an unsafe file first (it is what a
# user must hear about), then a bug in ckptkit, then an output not written, then an input
# not readable, then bad usage.
_SEVERITY = (4, 70, 5, 3, 2)


def worse_exit(a: int, b: int) -> int:
    """The exit code, of ``a`` and ``b``, that a run over several files reports (0: none)."""
    rank = {code: i for i, code in enumerate(_SEVERITY)}
    return min((c for c in (a, b) if c), key=lambda c: rank.get(c, len(rank)), default=0)


class CkptError(Exception):
    """Base of every expected failure; ``exit_code`` is what ``ckpt`` exits with."""

    exit_code = 3

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(CkptError):
    """The file is not a readable checkpoint: wrong kind of file, truncated or corrupt."""

    exit_code = 3


class UnsafeFileError(FormatError):
    """The file asks for something a data-only reader must refuse (code, unknown globals)."""

    exit_code = 4


class OutputError(CkptError):
    """The output cannot be written where asked (it is an input, its folder is missing...)."""

    exit_code = 5


class UsageError(CkptError):
    """The options given do not make sense together or name something that does not exist."""

    exit_code = 2
