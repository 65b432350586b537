"""``ckpt scan PATH...``: safe / unsafe / error for every file, with the reasons.

Every string that comes from a file (its name, a global it names, a ZIP member's name, a
reason quoting it) is printed through ``printable``, so a hostile file cannot send escape
sequences to the terminal. ``--json`` prints strict JSON: control and bidi characters are
escaped (``json_dumps``), and a file name that is not valid UTF-8 has each such byte
written as the four characters ``\\xNN`` in ``path`` (see ``json_text``), plus ``path_bytes``,
the name's exact bytes in hex, for a consumer that needs to open the file.
"""

from __future__ import annotations

import os

from ..errors import counted
from ..ops.scan import ScanResult, exit_code, scan_file, walk
from ..safe_text import has_surrogates, json_dumps, json_safe, printable
from .progress import add_output_options, progress_for

_LABELS = {"safe": "SAFE", "unsafe": "UNSAFE", "error": "ERROR", "skipped": "SKIP"}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "scan", help="check files or folders for pickles that would run code",
        description="Check every file under the given paths (folders recursively, whatever "
                    "the extension; symbolic links to folders are followed) with the same "
                    "restricted reader that loads them. Exit code 0: all safe (or not model "
                    "files); 4: something unsafe; 3: something unreadable (a file, a folder, "
                    "a path that does not exist); 2: bad usage.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--verify-data", action="store_true",
                        help="also check the CRC of every tensor record (reads all data)")
    add_output_options(parser, json_help="print a JSON report")
    parser.set_defaults(run=run)


def run(args) -> int:
    items = list(walk(args.paths))
    sizes = {item: _size(item) for item in items if isinstance(item, str)}
    bar = progress_for(args, "scan", unit="files")
    bar.start(sum(sizes.values()), len(sizes))
    results = []
    for item in items:
        if isinstance(item, ScanResult):
            result = item  # a path that could not be walked: already decided
        else:
            result = scan_file(item, verify_data=args.verify_data)
            bar.update(sizes[item], 1)
        results.append(result)
        if not args.json:
            _print_result(result, bar)
    bar.close()
    counts = {v: sum(r.verdict == v for r in results) for v in _LABELS}
    if args.json:
        print(json_dumps({"files": [_json_entry(r) for r in results],
                          "summary": {"files": len(results), **counts}}))
    elif not results:
        print("nothing was scanned: no files under the paths given (an empty scan proves "
              "nothing)")
    else:
        print(f"{counted(len(results), 'file')}: "
              + ", ".join(counted(n, "error") if v == "error" else f"{n} {v}"
                          for v, n in counts.items()))
    return exit_code(results)


def _json_entry(result: ScanResult) -> dict:
    entry = json_safe(result.to_dict())
    if has_surrogates(result.path):
        entry["path_bytes"] = os.fsencode(result.path).hex()
    return entry


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _print_result(result, bar) -> None:
    if bar.enabled:
        bar.stream.write("\r\033[K")
    detail = f" ({result.format}, {result.tensors} tensors)" if result.tensors is not None else ""
    print(f"{_LABELS[result.verdict]:<7}{printable(result.path)}{printable(detail)}")
    for reason in result.reasons:
        where = f" [{reason['where']} byte {reason['offset']}]" if reason["where"] else ""
        why = f": {reason['why']}" if reason["why"] else ""
        print(f"         - {printable(reason['message'] + where + why)}")
