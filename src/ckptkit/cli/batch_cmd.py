"""``ckpt batch scan|inspect|hash LISTING_OR_DIR... -o RESULTS.parquet``: a row per file.

The work, the schema and the fault rules are ``ckptkit.batch``'s. This module parses, draws
the progress (files and bytes done, files a second, time left, errors so far) and prints the
summary; the exit code is ``ckpt scan``'s over every row of RESULTS.
"""

from __future__ import annotations

import sys
import time

from ..batch import run_batch
from ..batch.work import OPS
from ..errors import counted
from ..safe_text import json_dumps, printable
from .fmt import human_bytes
from .progress import ProgressBar, add_output_options


class BatchBar(ProgressBar):
    """A bar counting files (the total grows as the listing is walked) and errors."""

    def __init__(self, label: str, enabled: bool | None):
        super().__init__(label, unit="files", enabled=enabled)
        self.errors = 0

    def failed(self) -> None:
        self.errors += 1

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.items / elapsed
        left = (self.total_items - self.items) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\r\033[K{self.label} {self.items}/{self.total_items} files "
            f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} {rate:.0f} files/s "
            f"{left:4.0f}s left {counted(self.errors, 'error')}")
        self.stream.flush()


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "batch", help="scan, identify or hash many files into a Parquet table (locally or "
                      "on a Ray cluster)",
        description="Do the work of ckpt scan, ckpt inspect or ckpt hash for every "
                    "file of the listings (folders, walked as ckpt scan walks them; text "
                    "files of paths, one per line; Parquet files with a 'path' column), "
                    "writing one row per file to a Parquet file as the run goes. Exit code "
                    "as ckpt scan's over every row: 4 when a file is unsafe, 3 when one "
                    "could not be read.")
    parser.add_argument("op", choices=OPS,
                        help="scan: safe/unsafe and findings; inspect: also what the file "
                             "is; hash: also the file hashes and component digests of ckpt "
                             "hash (reads every file)")
    parser.add_argument("sources", nargs="+", metavar="LISTING_OR_DIR")
    parser.add_argument("-o", "--output", required=True, metavar="RESULTS.parquet")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run on a Ray cluster: its address (host:port or ray://...), "
                             "'auto' (the cluster this machine belongs to) or 'local' (a "
                             "cluster started for this run); needs ckptkit[ray]")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of files already in RESULTS (or in the parts "
                             "an interrupted run left) whose size and mtime are unchanged")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes (or Ray actors) doing the work; default: one per CPU")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds one file may take before it gets an error row "
                             "(default 60; the hash stage adds a second per 16 MiB)")
    add_output_options(parser, json_help="print a JSON summary")
    parser.set_defaults(run=run)


def run(args) -> int:
    bar = BatchBar(f"batch {args.op}", enabled=False if args.quiet or args.json else None)
    started = time.monotonic()
    try:
        summary = run_batch(args.op, args.sources, args.output, ray=args.ray,
                            resume=args.resume, workers=args.workers, timeout=args.timeout,
                            progress=bar)
    except KeyboardInterrupt:
        bar.close()
        print(f"ckpt: interrupted after {counted(bar.items, 'file')} "
              f"({time.monotonic() - started:.0f} s); the rows done are kept in "
              f"{printable(args.output)}.parts: run the same command with --resume to finish",
              file=sys.stderr)
        return 130
    bar.close()
    if args.json:
        print(json_dumps(summary.to_dict()))
    else:
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(summary.verdicts.items()))
        print(f"{counted(summary.files, 'file')} in {printable(args.output)} ({verdicts}; "
              f"{counted(summary.errors, 'error')}): {summary.done} done in "
              f"{summary.seconds:.1f} s, {summary.resumed} kept from an earlier run")
    return summary.exit_code
