"""A progress bar on stderr for long jobs: bytes and items done, speed and time left.
``with progress_for(args, "merge") as bar: ...`` draws it for the work and closes it after.

Drawn only when stderr is a terminal and ``--quiet`` was not given, at most ten times a
second, so that piping ``ckpt`` into a file or another program stays clean.
"""

from __future__ import annotations

import sys
import time

from .fmt import human_bytes


class ProgressBar:
    def __init__(self, label: str, unit: str = "tensors", enabled: bool | None = None,
                 stream=None, counts_only: bool = False):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.unit = unit
        self.counts_only = counts_only  # work measured in items alone (denoising steps)
        self.total_bytes = 0
        self.total_items = 0
        self.bytes = 0
        self.items = 0
        self.started = time.monotonic()
        self._begun = False
        self._last_draw = 0.0

    def start(self, total_bytes: int, total_items: int) -> None:
        """Adds a piece of work to the totals: a job that writes several files (a split)
        starts each one on the same bar."""
        if not self._begun:
            self._begun = True
            self.started = time.monotonic()
        self.total_bytes += total_bytes
        self.total_items += total_items

    def update(self, nbytes: int, items: int = 0) -> None:
        self.bytes += nbytes
        self.items += items
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.items == self.total_items):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(self.bytes / max(self.total_bytes, 1), 1.0)
        elapsed = max(now - self.started, 1e-6)
        speed = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / speed if speed > 0 else 0.0
        filled = int(fraction * 24)
        bar = "█" * filled + " " * (24 - filled)
        if self.counts_only:
            rate = self.items / elapsed
            left = (self.total_items - self.items) / rate if rate > 0 else 0.0
            self.stream.write(f"\r{self.label} {fraction:4.0%} |{bar}| {self.items}/"
                              f"{self.total_items} {self.unit} {rate:.2f} {self.unit}/s "
                              f"{left:4.0f}s left ")
            self.stream.flush()
            return
        self.stream.write(
            f"\r{self.label} {fraction:4.0%} |{bar}| {human_bytes(self.bytes)}/"
            f"{human_bytes(self.total_bytes)} {self.items}/{self.total_items} {self.unit} "
            f"{human_bytes(speed)}/s {left:4.0f}s left ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        """The bar ends on its own line however the work ended: the error line that follows
        an interrupted bar starts on a line of its own."""
        self.close()


def add_output_options(parser, json_help: str = "print the result as JSON") -> None:
    """The ``--quiet`` and ``--json`` options every long-running command takes."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help=json_help)


def add_fsync_option(parser) -> None:
    """``--no-fsync``: outputs renamed without waiting for their data to reach the disk."""
    parser.add_argument("--no-fsync", dest="fsync", action="store_false",
                        help="do not wait for the data to reach the disk before renaming "
                             "(faster; a crash soon after may leave an incomplete file)")


def add_hash_option(parser) -> None:
    """``--hash``: the inputs' SHA-256 in the output's provenance metadata."""
    parser.add_argument("--hash", action="store_true",
                        help="compute the SHA-256 of every input for the output's metadata "
                             "(reads each input once more; without it, only the hashes "
                             "ckptkit already knows are recorded)")


def progress_for(args, label: str, unit: str = "tensors") -> ProgressBar:
    """A bar for a command's work, off when ``--quiet`` or ``--json`` asked for silence."""
    return ProgressBar(label, unit=unit, enabled=False if args.quiet or args.json else None)
