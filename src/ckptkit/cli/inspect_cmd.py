"""``ckpt inspect FILE...``: what each file holds, read from its header, as text or JSON.

Each file is reported on its own: one that cannot be read (or trips a bug) gets its error
line (and with ``--json`` an ``{"path", "error"}`` object) and the next files are still
inspected; the exit code is the first failure's. ``--json`` prints strict JSON in valid
UTF-8 (see ``safe_text.json_safe``: non-finite numbers as "nan"/"inf"/"-inf" strings).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ..errors import CkptError
from ..formats import detect_format
from ..ops.inspect import inspect_diffusers_folder, inspect_file, is_diffusers_folder
from ..ops.scan import iter_files
from ..safe_text import json_safe, printable
from .fmt import human_bytes, human_count
from .progress import ProgressBar


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", help="say what files are: family, components, dtypes, metadata, hashes",
        description="Show what checkpoint files hold, from their headers alone (no tensor "
                    "data is read).")
    parser.add_argument("files", nargs="+", metavar="PATH",
                        help="files, or folders (every model file in them, recursively)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per file, one per line")
    parser.add_argument("--hash", action="store_true",
                        help="also compute SHA-256, AutoV2 and AutoV3 (reads the whole file) "
                             "and look the file up among official releases")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _expand(paths: list[str]) -> tuple[list[str], bool]:
    """Files named, plus the model files found in named folders (by content, not name)."""
    files, folders = [], False
    for path in paths:
        if not os.path.isdir(path) or is_diffusers_folder(path):
            files.append(path)
            continue
        folders = True
        for found in iter_files([path]):
            pipeline = _pipeline_of(found, path)
            if pipeline:  # its files are reported as the one folder they make
                if pipeline not in files:
                    files.append(pipeline)
                continue
            try:
                detect_format(found)
            except CkptError:
                continue  # configs, images, text: not model files
            files.append(found)
    return files, folders


def _pipeline_of(found: str, top: str) -> str | None:
    """The diffusers folder (below ``top``) that ``found`` belongs to: its folder, or that
    folder's parent (a component's folder), where it holds a ``model_index.json``."""
    parent = os.path.dirname(found)
    for folder in (parent, os.path.dirname(parent)):
        inside = os.path.commonpath([os.path.abspath(folder), os.path.abspath(top)]) == \
            os.path.abspath(top)
        if inside and is_diffusers_folder(folder):
            return folder
    return None


def run(args) -> int:
    status = 0
    files, folders = _expand(args.files)
    bar = ProgressBar("inspect", unit="files",
                      enabled=False if args.quiet or not (folders or args.hash) else None)
    bar.start(sum(os.path.getsize(f) for f in files if os.path.isfile(f)), len(files))
    for index, path in enumerate(files):
        try:
            if os.path.isdir(path):
                report = inspect_diffusers_folder(path)
            else:
                report = inspect_file(path, hashes=args.hash)
            bar.update(report.get("file_size", 0), 1)
        except CkptError as exc:
            print(f"ckpt: error: {printable(str(exc))}", file=sys.stderr)
            _print_error(args, path, exc.reason)
            status = status or exc.exit_code
            continue
        except OSError:
            raise  # a closed stdout, a full disk: nothing more can be reported
        except Exception as exc:  # a bug on one file must not hide the report of the others
            if os.environ.get("CKPT_DEBUG"):
                raise
            what = f"internal error: {type(exc).__name__}: {exc}"
            print(f"ckpt: {printable(what)} while inspecting {printable(path)} (a bug in "
                  "ckptkit; CKPT_DEBUG=1 shows the traceback, please report it)",
                  file=sys.stderr)
            _print_error(args, path, what)
            status = status or 70
            continue
        if bar.enabled:
            bar.stream.write("\r\033[K")
        report = json_safe(report)
        if args.json:
            print(_dumps(report))
        else:
            if index:
                print()
            print_report(report)
    bar.close()
    return status


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def _print_error(args, path: str, reason: str) -> None:
    if args.json:
        print(_dumps(json_safe({"path": path, "error": reason})))


def _write_safely(text: str) -> None:
    """Writes report lines with control characters escaped (names, metadata and reasons are
    the file's own text: an escape sequence in them must be shown, not obeyed); line breaks
    stay, so that indented JSON keeps its shape."""
    sys.stdout.write("\n".join(printable(line) for line in text.split("\n")))


def print_report(report: dict[str, Any]) -> None:
    out = _write_safely
    out(f"{report['path']}\n")
    if report["format"] == "diffusers-folder":
        ident = report["identification"]
        out(f"  {'is':<11}diffusers-folder  {ident['family'] or ''}  ({report['pipeline']})\n")
        for name, part in report["components"].items():
            sub = part["identification"]
            out(f"  {name:<15}{sub['kind']:<17}{', '.join(part['files'])}\n")
        for reason in ident["reasons"]:
            out(f"    because {reason}\n")
        return
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
    if "identification" in report:
        _print_identification(report["identification"], out)
    if "hashes" in report:
        out("  hashes\n")
        for name, value in report["hashes"].items():
            out(f"    {name:<9}{value}\n")
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


def _print_identification(ident: dict[str, Any], out) -> None:
    what = ident["kind"]
    if ident["family"]:
        what += f"  {ident['family']}"
    if ident["variants"]:
        what += f"  ({', '.join(ident['variants'])})"
    if ident["layout"]:
        what += f"  layout {ident['layout']}"
    out(f"  {'is':<11}{what}\n")
    if ident["compatible_families"]:
        out(f"  {'fits':<11}{', '.join(ident['compatible_families'])}\n")
    if ident["closest"]:
        out(f"  {'closest':<11}{ident['closest']}\n")
    for comp in ident["components"]:
        dtypes = ", ".join(f"{k} {v}" for k, v in comp["dtypes"].items())
        prefix = comp["prefix"] or "(bare keys)"
        out(f"  {'component':<11}{comp['name']:<16}{prefix:<40}"
            f"{human_count(comp['parameters']):>9}  {dtypes}  {comp['size']}\n")
    if ident["missing"]:
        out(f"  {'missing':<11}{', '.join(ident['missing'])}\n")
    if ident["ambiguous"]:
        out(f"  cannot tell {', '.join(ident['ambiguous'])} (from weights alone)\n")
    for group, count in ident["extra"].items():
        out(f"  {'extra':<11}{count:,} {group}\n")
    lora = ident.get("lora")
    if lora:
        alphas = lora["alphas"]
        if alphas is not None:  # "nan" and "inf" (json_safe) shown like the numbers
            alphas = f"[{', '.join(str(a) for a in alphas)}]"
        out(f"  {'lora':<11}{lora['format']}, ranks {lora['ranks']}, alphas {alphas}, "
            f"{lora['modules']} modules in {', '.join(lora['components'])}\n")
    sampling = ident.get("sampling")
    if sampling:
        w, h = sampling["resolution"]
        out(f"  {'sampling':<11}{w}x{h}, {sampling['steps']} steps, guidance "
            f"{sampling['guidance']}, {sampling['prediction']}, {sampling['scheduler']}"
            + (f", shift {sampling['shift']}" if sampling["shift"] else "")
            + (f" ({sampling['note']})" if sampling["note"] else "") + "\n")
    for reason in ident["reasons"]:
        out(f"    because {reason}\n")


def _short(value: Any, pretty: bool = False) -> str:
    if isinstance(value, str):
        text = value
    elif pretty and isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n      ")
    else:
        text = json.dumps(value, ensure_ascii=False)
    limit = 2000 if pretty else 200
    return text if len(text) <= limit else text[:limit - 3] + "..."
