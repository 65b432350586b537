"""``FILE[:NUMBER[:NUMBER]]`` arguments: bake's strengths, merge's weights.

A file name may itself hold colons (``C:/x.safetensors``, ``dir:name``), so what follows a
colon counts as a number only when it reads as one. When the whole text names no file but a
part before a colon does (``x.safetensors:abc``, ``x.safetensors:1:2:3``), what follows was
meant as numbers: that is a usage error saying so, not "no such file" for a name nobody
gave."""

from __future__ import annotations

import math
import os
import re

from ..errors import UsageError
from ..safe_text import printable

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def split_numbers(text: str, most: int, what: str) -> tuple[str, list[float]]:
    """The file and up to ``most`` finite numbers after it; ``what`` names them for errors
    ("STRENGTH[:TE_STRENGTH]", "WEIGHT")."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < most and _NUMBER.match(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    if not path:
        raise UsageError(f"{printable(text)!r}: give the LoRA file before its {what}")
    if not all(math.isfinite(n) for n in numbers):
        raise UsageError(f"{printable(text)}: the {what} must be finite numbers")
    if not os.path.exists(path):
        for end in range(len(parts) - 1, 0, -1):
            head = ":".join(parts[:end])
            if os.path.exists(head):
                rest = text[len(head) + 1:]
                raise UsageError(f"{printable(text)}: {printable(rest)!r} "
                                 f"after {printable(head)} is not {what} (at most {most} "
                                 f"finite number{'s' if most > 1 else ''} after colons)")
    return path, numbers
