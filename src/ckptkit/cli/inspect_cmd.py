"""``ckpt inspect FILE...``: what each file holds, read from its header, as text or JSON.

Each file is reported on its own: one that cannot be read (or trips a bug) gets its error
line (and with ``--json`` its ``cli.failure`` object) and the next files are still
inspected; the exit code is the worst failure's (an unsafe file first: errors.worse_exit).
``--json`` prints strict JSON in valid UTF-8 (see ``safe_text.json_dumps``: non-finite
numbers as "nan"/"inf"/"-inf" strings, control and bidi characters as escapes).
``--brief`` prints one line per file (errors too); a LoRA's modules are summarised by
component and format unless ``--verbose``.

In a folder, the files reported are those whose content is a checkpoint, those named like
one (``sniff.MODEL_EXTENSIONS``: an HTML page, a Git LFS pointer, an empty download or a
GGUF file under a model's name is listed with its error, as it would be on its own) and
those refused as unsafe; other files (configs, images, text) are passed over.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ..errors import CkptError, FormatError, UnsafeFileError, counted, worse_exit
from ..formats import detect_format
from ..formats.sniff import MODEL_EXTENSIONS
from ..lora.detect import KEY_FORMATS
from ..ops.inspect import inspect_diffusers_folder, inspect_file, is_diffusers_folder
from ..ops.scan import ERROR, ScanResult, walk
from ..safe_text import json_dumps, json_safe, printable
from .failure import error_reason, exit_code, report_failure
from .fmt import human_bytes, human_count
from .progress import ProgressBar

MAX_PREFIX_ROWS = 30  # key prefix groups shown without --verbose
MAX_LINE = 4000  # characters of one line of a text report


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", help="say what files are: family, components, dtypes, metadata, hashes",
        description="Show what checkpoint files hold, from their headers alone (no tensor "
                    "data is read).")
    parser.add_argument("files", nargs="+", metavar="PATH",
                        help="files, or folders (every model file in them, recursively)")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true",
                      help="print one JSON object per file, one per line")
    view.add_argument("--brief", action="store_true",
                      help="one line per file: kind, family, variant (a LoRA's format and "
                           "ranks), size, dtype, name")
    parser.add_argument("--verbose", action="store_true",
                        help="list every key prefix group (a LoRA's every module) instead "
                             "of a summary")
    parser.add_argument("--hash", action="store_true",
                        help="also compute SHA-256, AutoV2 and AutoV3 (reads the whole file) "
                             "and look the file up among official releases")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _expand(paths: list[str]) -> tuple[list[str], dict[str, CkptError], bool]:
    """Files named, plus the model files found in named folders (see ``_is_model_file``);
    the errors of subfolders that could not be listed (whose files are unknown), by path;
    and whether any folder was named."""
    files: list[str] = []
    unlisted: dict[str, CkptError] = {}
    folders = False
    for path in paths:
        if not os.path.isdir(path) or is_diffusers_folder(path):
            files.append(path)
            continue
        folders = True
        for found in walk([path]):
            if isinstance(found, ScanResult):  # a folder that cannot be listed, or a loop
                if found.verdict == ERROR:
                    unlisted[found.path] = FormatError(found.reasons[0]["message"], found.path)
                    files.append(found.path)
                continue
            pipeline = _pipeline_of(found, path)
            if pipeline:  # its files are reported as the one folder they make
                if pipeline not in files:
                    files.append(pipeline)
                continue
            if _is_model_file(found):
                files.append(found)
    return files, unlisted, folders


def _is_model_file(path: str) -> bool:
    """Whether a file found in a folder is reported: a checkpoint by content, a file named
    like one whatever its content, or one refused as unsafe."""
    if os.path.splitext(path)[1].lower() in MODEL_EXTENSIONS:
        return True
    try:
        detect_format(path)
    except UnsafeFileError:
        return True
    except CkptError:
        return False  # configs, images, text: not model files
    return True


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
    files, unlisted, folders = _expand(args.files)
    if not files:  # only folders, holding no model file: silence would read as success
        print("ckpt: nothing to inspect: no model files under "
              f"{printable(', '.join(args.files))}", file=sys.stderr)
        return 0
    bar = ProgressBar("inspect", unit="files",
                      enabled=False if args.quiet or not (folders or args.hash) else None)
    bar.start(sum(os.path.getsize(f) for f in files if os.path.isfile(f)), len(files))
    rows = [("kind", "family", "variant", "size", "dtype", "file")]  # the --brief listing
    printed = False
    for path in files:
        try:
            if path in unlisted:
                raise unlisted[path]
            if os.path.isdir(path):
                report = inspect_diffusers_folder(path)
            else:
                report = inspect_file(path, hashes=args.hash)
            bar.update(report.get("file_size", 0), 1)
        except OSError:
            raise  # a closed stdout, a full disk: nothing more can be reported
        except Exception as exc:  # a bug on one file must not hide the report of the others
            if not isinstance(exc, CkptError) and os.environ.get("CKPT_DEBUG"):
                raise
            status = worse_exit(status, _failed(args, bar, rows, path, exc))
            continue
        _clear_bar(bar)
        if args.json:  # json_dumps makes it JSON-safe itself
            print(json_dumps(report))
            continue
        report = json_safe(report)
        if args.brief:
            rows.append(_brief_row(report))
        else:
            if printed:
                print()
            print_report(report, verbose=args.verbose)
            printed = True
    bar.close()
    if args.brief and len(rows) > 1:
        for line in _table(rows):
            _write_safely(line)
    return status


def _clear_bar(bar: ProgressBar) -> None:
    if bar.enabled:
        bar.stream.write("\r\033[K")


def _failed(args, bar: ProgressBar, rows: list[tuple[str, ...]], path: str,
            exc: Exception) -> int:
    """Reports a file that could not be inspected: its error line on stderr (with --json,
    also its object, ``report_failure``), or with --brief its row in the listing; returns
    the exit code it asks for."""
    _clear_bar(bar)
    if not args.brief:
        return report_failure(exc, args.json, path=path)
    # the listing's own row says it; the exit code still does
    reason = exc.reason if isinstance(exc, CkptError) else error_reason(exc)
    rows.append(("error", "-", "-", "-", "-", f"{path}: {reason}"))
    return exit_code(exc)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` as lines of aligned columns (the last one, the file, as long as it is)."""
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0]) - 1)]
    return ["".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False))
            + row[-1] + "\n" for row in rows]


def _brief_row(report: dict[str, Any]) -> tuple[str, ...]:
    """One file in a line: kind, family, variant (a LoRA's format and ranks), size, the
    dtypes by share of parameters, and the path."""
    ident = report["identification"]
    if report["format"] == "diffusers-folder":
        return ("diffusers-folder", ident["family"] or "-", report["pipeline"] or "-", "-",
                "-", report["path"])
    family = ident["family"] or "/".join(ident["compatible_families"]) or "-"
    variant = ", ".join(ident["variants"]) or "-"
    lora = ident.get("lora")
    if lora:
        variant = lora["format"] + (f" r{_span(lora['ranks'])}" if lora["ranks"] else "")
    dtypes = list(report["dtypes"])
    dtype = "/".join(dtypes[:2]) + ("+" if len(dtypes) > 2 else "") or "-"
    return (ident["kind"], family, variant, human_bytes(report["file_size"]), dtype,
            report["path"])


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _write_safely(line: str) -> None:
    """Writes one report line with control characters escaped (names, metadata and reasons
    are the file's own text: an escape sequence in them must be shown, not obeyed, and a
    line break in a key name must not start a line of its own that reads like the report's).
    Only a final line break is kept. A line longer than ``MAX_LINE`` (a key name of
    megabytes) is cut, saying how much was left out: ``--json`` has it whole."""
    end = "\n" if line.endswith("\n") else ""
    sys.stdout.write(printable(_cut(line.removesuffix("\n"))) + end)


def _cut(line: str) -> str:
    if len(line) <= MAX_LINE:
        return line
    return f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE:,} more characters)"


def print_report(report: dict[str, Any], verbose: bool = False) -> None:
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
                    f"{_parameters(report['parameter_count'])} "
                    f"({human_bytes(report['tensor_bytes'])})"),
    ]
    if report.get("quantization"):
        rows.append(("quantized", _quantization(report["quantization"])))
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
        out(f"    {name:<12}{_counts(entry['tensors'], entry['parameters'])}\n")
    lora = report.get("identification", {}).get("lora")
    if lora and lora.get("groups") and not verbose:
        _print_adapters(lora["groups"], out)
    else:
        _print_prefixes(report["prefixes"], out, verbose)
    if report.get("extras"):
        out("  other entries (not weights; not loaded)\n")
        for key, value in report["extras"].items():
            out(f"    {key}: {_short(value)}\n")
    if report["metadata"]:
        out("  metadata\n")
        for key, value in report["metadata"].items():
            first, *rest = _short(value, pretty=True).split("\n")  # JSON's own line breaks
            out(f"    {key}: {first}\n")
            for line in rest:
                out(f"{line}\n")
    for note in report["notes"]:
        out(f"  note: {note}\n")


def _quantization(summary: dict[str, Any]) -> str:
    """One line: the scheme, the stored types by share of parameters, the bits per weight."""
    shares = ", ".join(f"{name} {entry['share']:.1%}" for name, entry in
                       sorted(summary["types"].items(), key=lambda kv: -kv[1]["parameters"]))
    return (f"{summary['scheme']}: {shares} of parameters; {summary['bits_per_weight']:.2f} "
            f"bits per weight; {counted(summary['quantized_tensors'], 'quantized tensor')} read as "
            f"{summary['reads_as']}")


def _counts(tensors: int, parameters: int) -> str:
    word = "tensor" if tensors == 1 else "tensors"
    return f"{tensors:>7,} {word:<7}  {human_count(parameters):>9} " + (
        "parameter" if parameters == 1 else "parameters")


def _parameters(n: int) -> str:
    return f"{human_count(n)} parameter" + ("" if n == 1 else "s")


def _print_prefixes(prefixes: list[dict[str, Any]], out, verbose: bool) -> None:
    shown = prefixes if verbose else prefixes[:MAX_PREFIX_ROWS]
    out("  key prefixes\n")
    width = min(max((len(p["prefix"]) for p in shown), default=0), 60) + 2
    for entry in shown:
        name = entry["prefix"] if len(entry["prefix"]) <= 200 else entry["prefix"][:197] + "..."
        out(f"    {name:<{width}}{_counts(entry['tensors'], entry['parameters'])}\n")
    if len(shown) < len(prefixes):
        rest = prefixes[len(shown):]
        out(f"    ... and {counted(len(rest), 'more group')} holding "
            f"{counted(sum(p['tensors'] for p in rest), 'tensor')} (--verbose lists them)\n")


def _print_adapters(groups: list[dict[str, Any]], out) -> None:
    """A LoRA's modules by component and format, with their ranks (--verbose: every module
    as a key prefix group)."""
    out("  adapters\n")
    for group in groups:
        ranks = group["ranks"]
        rank = f"rank {_span(ranks)}" if ranks else "no rank"
        out(f"    {group['component']:<17}{group['format']:<20}"
            f"{counted(group['modules'], 'module'):>12}  {rank}\n")


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
        # A checkpoint lacks them; a diffusion model alone is meant to be loaded beside them.
        label = "missing" if ident["kind"] == "checkpoint" else "loads with"
        out(f"  {label:<11}{', '.join(ident['missing'])}\n")
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
            f"{counted(lora['modules'], 'module')} in {', '.join(lora['components'])}\n")
        if lora.get("key_format"):  # what `ckpt lora check` says of it too
            adapters = ", ".join(f"{n:,} {a}" for a, n in lora["adapters"].items())
            name = KEY_FORMATS.get(lora["key_format"], lora["key_format"])
            out(f"  {'key format':<11}{name}; modules: {adapters}\n")
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
        text = value.replace("\n", "\\n")  # one line: only JSON's indents may break it
    elif pretty and isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n      ")
    else:
        text = json.dumps(value, ensure_ascii=False)
    limit = 2000 if pretty else 200
    return text if len(text) <= limit else text[:limit - 3] + "..."
