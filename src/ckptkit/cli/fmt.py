"""Number formatting for people: sizes in KB/MB/GB, counts in K/M/G (plurals: errors.counted),
and the one warning every casting command prints about values the target dtype could not hold."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from ..errors import counted


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def warn_values(counts: Mapping[str, int], became: str) -> None:
    """Warn on stderr that values in ``counts`` (tensor -> how many) ``became`` something
    else in a cast ("beyond fp16's range and clamped"); nothing when there were none."""
    if counts:
        total = sum(counts.values())
        print(f"warning: {counted(total, 'value')} in {counted(len(counts), 'tensor')} "
              f"{'was' if total == 1 else 'were'} {became}", file=sys.stderr)
