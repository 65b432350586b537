"""``ckpt scan PATH...``: safe / unsafe / error for every file, with the reasons."""

from __future__ import annotations

import json
import os

from ..ops.scan import exit_code, iter_files, scan_file
from .progress import add_output_options, progress_for

_LABELS = {"safe": "SAFE", "unsafe": "UNSAFE", "error": "ERROR", "skipped": "SKIP"}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "scan", help="check files or folders for pickles that would run code",
        description="Check every file under the given paths (folders recursively, whatever "
                    "the extension) with the same restricted reader that loads them. Exit "
                    "code 0: all safe; 1: something unsafe; 2: something unreadable.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--verify-data", action="store_true",
                        help="also check the CRC of every tensor record (reads all data)")
    add_output_options(parser, json_help="print a JSON report")
    parser.set_defaults(run=run)


def run(args) -> int:
    files = list(iter_files(args.paths))
    bar = progress_for(args, "scan", unit="files")
    bar.start(sum(_size(f) for f in files), len(files))
    results = []
    for path in files:
        result = scan_file(path, verify_data=args.verify_data)
        results.append(result)
        bar.update(_size(path), 1)
        if not args.json:
            _print_result(result, bar)
    bar.close()
    counts = {v: sum(r.verdict == v for r in results) for v in _LABELS}
    if args.json:
        print(json.dumps({"files": [r.to_dict() for r in results],
                          "summary": {"files": len(results), **counts}}))
    else:
        print(f"{len(results)} files: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return exit_code(results)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _print_result(result, bar) -> None:
    if bar.enabled:
        bar.stream.write("\r\033[K")
    detail = f" ({result.format}, {result.tensors} tensors)" if result.tensors is not None else ""
    print(f"{_LABELS[result.verdict]:<7}{result.path}{detail}")
    for reason in result.reasons:
        where = f" [{reason['where']} byte {reason['offset']}]" if reason["where"] else ""
        why = f": {reason['why']}" if reason["why"] else ""
        print(f"         - {reason['message']}{where}{why}")
