"""``ckpt inspect FILE...``: what each file holds, read from its header, as text or JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import CkptError
from ..ops.inspect import inspect_file
from .fmt import human_bytes, human_count


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", help="show format, tensors, dtypes, key prefixes and metadata of files",
        description="Show what checkpoint files hold, from their headers alone (no tensor "
                    "data is read).")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per file, one per line")
    parser.set_defaults(run=run)


def run(args) -> int:
    status = 0
    for index, path in enumerate(args.files):
        try:
            report = inspect_file(path)
        except CkptError as exc:
            print(f"ckpt: error: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"path": path, "error": exc.reason}))
            status = status or exc.exit_code
            continue
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            if index:
                print()
            print_report(report)
    return status


def print_report(report: dict[str, Any]) -> None:
    out = sys.stdout.write
    out(f"{report['path']}\n")
    rows = [
        ("format", report["format"]),
        ("size", f"{human_bytes(report['file_size'])} ({report['file_size']:,} bytes)"),
        ("tensors", f"{report['tensor_count']:,} holding "
                    f"{human_count(report['parameter_count'])} parameters "
                    f"({human_bytes(report['tensor_bytes'])})"),
    ]
    if report.get("weights_at"):
        rows.append(("weights at", report["weights_at"]))
    for name, value in rows:
        out(f"  {name:<11}{value}\n")
    out("  dtypes\n")
    for name, entry in report["dtypes"].items():
        out(f"    {name:<12}{entry['tensors']:>7,} tensors  "
            f"{human_count(entry['parameters']):>9} parameters\n")
    out("  key prefixes\n")
    width = max((len(p["prefix"]) for p in report["prefixes"]), default=0) + 2
    for entry in report["prefixes"]:
        out(f"    {entry['prefix']:<{width}}{entry['tensors']:>7,} tensors  "
            f"{human_count(entry['parameters']):>9} parameters\n")
    if report.get("extras"):
        out("  other entries (not weights; not loaded)\n")
        for key, value in report["extras"].items():
            out(f"    {key}: {_short(value)}\n")
    if report["metadata"]:
        out("  metadata\n")
        for key, value in report["metadata"].items():
            out(f"    {key}: {_short(value, pretty=True)}\n")
    for note in report["notes"]:
        out(f"  note: {note}\n")


def _short(value: Any, pretty: bool = False) -> str:
    if isinstance(value, str):
        text = value
    elif pretty and isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n      ")
    else:
        text = json.dumps(value, ensure_ascii=False)
    limit = 2000 if pretty else 200
    return text if len(text) <= limit else text[:limit - 3] + "..."
