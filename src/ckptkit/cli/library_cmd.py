"""``ckpt library SUBCOMMAND``: index model folders, then list, find, show, dedupe, trace.

Each subcommand is one ``_add_<name>`` function that declares its parser and one ``_<name>``
function that runs it; ``SUBCOMMANDS`` lists the adders. Every one takes ``--db PATH``
(default: ``library.sqlite`` in ckptkit's cache folder) and ``--json``. A database that is
corrupt, locked for too long, or made by a newer ckptkit is one line and an exit code
(``library.db``). Text that comes from files (names, metadata, sidecars) is printed through
``printable``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

from ..arch.detect import KINDS
from ..errors import UsageError, counted
from ..library import queries
from ..library.db import database_errors, default_path, open_library
from ..library.index import scan_library
from ..safe_text import json_dumps, printable
from . import library_serve_cmd
from .failure import report_failure
from .fmt import human_bytes
from .progress import ProgressBar


def add_parser(commands) -> None:
    p = commands.add_parser(
        "library", help="index model folders: hashes, duplicates, shared parts, lineage",
        description="Keep an index (SQLite) of every model file under some folders: all "
                    "hashes, what each file is, its components' content digests, its scan "
                    "verdict, metadata, the sidecar files other tools write; then list, "
                    "find, show, find duplicates and trace merges from it.")
    sub = p.add_subparsers(dest="library_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)


def add_db_option(p) -> None:
    """``--db PATH`` and ``--json``, which every library subcommand takes."""
    p.add_argument("--db", metavar="PATH", help=f"the library database (default: "
                   f"{default_path()})")
    p.add_argument("--json", action="store_true", help="print JSON")


def _query_parser(sub, name: str, run, *, given: tuple[str, str] | None = None, **texts):
    """A read-only subcommand: its parser (``texts``: help, description), the one argument
    ``given`` (its name and metavar) where it takes one, ``--db`` and ``--json``."""
    p = sub.add_parser(name, **texts)
    if given:
        p.add_argument(given[0], metavar=given[1])
    add_db_option(p)
    p.set_defaults(run=run)


@contextlib.contextmanager
def _reading(args) -> Iterator[sqlite3.Connection]:
    """The library, open for a query; its errors as one line (``database_errors``)."""
    path = args.db or default_path()
    with database_errors(path):
        conn = open_library(path, create=False)
        try:
            yield conn
        finally:
            conn.close()


# --- scan ----------------------------------------------------------------------------------


def _add_scan(sub) -> None:
    p = sub.add_parser(
        "scan", help="index every model file under the folders",
        description="Index every model file under the folders (recursively). Files already "
                    "indexed whose size, modification time and inode are unchanged are not "
                    "read; a renamed or moved file (same inode) is recognised without "
                    "reading it; every other file is read once for all its hashes and "
                    "digests. Interrupting keeps what was indexed. Files gone from the "
                    "folders are removed from the index.")
    p.add_argument("folders", nargs="+", metavar="DIR")
    add_db_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no list of files")
    p.set_defaults(run=_scan)


def _scan(args) -> int:
    path = args.db or default_path()
    conn = open_library(path, create=True)
    bar = ProgressBar("library", unit="files",
                      enabled=False if args.quiet or args.json else None)

    def told(file: str, what: str) -> None:
        if not (args.quiet or args.json):
            if bar.enabled:
                bar.stream.write("\r\033[K")
            print(printable(f"{what:<8}{file}"))

    try:
        with bar, database_errors(path, writing=True):
            stats = scan_library(conn, args.folders, progress=bar, on_file=told)
    except KeyboardInterrupt:
        return report_failure(KeyboardInterrupt("interrupted; the files indexed so far are "
                                                "kept"), args.json)
    finally:
        conn.close()
    result = stats.to_dict()
    if args.json:
        print(json_dumps({"db": path, **result}))
    elif not args.quiet:
        print(f"{counted(stats.files, 'model file')}: {stats.new} new, {stats.changed} "
              f"changed, {stats.unchanged} unchanged, {stats.moved} moved, {stats.removed} "
              f"removed; {counted(stats.hashed, 'file')} read ({human_bytes(stats.hashed_bytes)}) "
              f"in {stats.seconds:.1f} s")
    for problem in stats.problems:
        print(printable(f"warning: {problem['path']}: {problem['problem']}"), file=sys.stderr)
    return 3 if stats.problems else 0


# --- list, find ----------------------------------------------------------------------------


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="the indexed files, filtered",
                       description="List the indexed files, sorted by path.")
    p.add_argument("--kind", type=str.lower, choices=KINDS, metavar="KIND",
                   help=", ".join(KINDS))
    p.add_argument("--family", type=str.lower, choices=queries.FAMILIES, metavar="FAMILY",
                   help=", ".join(queries.FAMILIES) + " (flux1: a FLUX.1 LoRA)")
    p.add_argument("--base", help="a part of the base model (Civitai's 'SDXL 1.0', kohya's "
                                  "'sdxl_base_v1-0') or of the family")
    p.add_argument("--verdict", choices=("safe", "unsafe", "error"))
    p.add_argument("--name", help="a part of the path or the title")
    add_db_option(p)
    p.set_defaults(run=_list)


def _list(args) -> int:
    with _reading(args) as conn:
        found = queries.list_models(conn, kind=args.kind, family=args.family, base=args.base,
                                    verdict=args.verdict, name=args.name)
    _print_models(found, args.json)
    return 0


def _add_find(sub) -> None:
    _query_parser(sub, "find", _find, given=("query", "HASH_OR_NAME"),
                  help="files by any hash (or its prefix) or by name",
                  description="Find files by SHA-256, AutoV1, AutoV2, AutoV3, BLAKE3 (or a "
                              "prefix of 8 digits or more), CRC-32, a component's content "
                              "digest, or a part of the name.")


def _find(args) -> int:
    with _reading(args) as conn:
        found = queries.find(conn, args.query)
    _print_models(found, args.json)
    return 0


def _print_models(found: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json_dumps(found))
        return
    for m in found:
        what = f"{m['family'] or '-'} {m['kind'] or '-'}"
        matched = f"  [{m['matched']}]" if "matched" in m else ""
        print(printable(f"{m['id']:>5}  {m['verdict']:<6} {what:<28} {human_bytes(m['size']):>10}"
                        f"  {(m['sha256'] or '')[:10]}  {m['display']}{matched}"))
    print(counted(len(found), "file"), file=sys.stderr)


# --- show ----------------------------------------------------------------------------------


def _add_show(sub) -> None:
    _query_parser(sub, "show", _show, given=("file", "FILE_OR_ID"),
                  help="everything indexed about one file",
                  description="Show one indexed file (by path or id): identification, "
                              "hashes, components and where else they are, metadata, "
                              "sidecars, preview, duplicates, parents and children.")


def _model(conn, key: str) -> dict[str, Any]:
    found = queries.model(conn, key)
    if found is None:
        raise UsageError("is not in the library (scan its folder first)", key)
    return found


def _show(args) -> int:
    with _reading(args) as conn:
        m = _model(conn, args.file)
    if args.json:
        print(json_dumps(m))
        return 0

    def out(label: str, text: Any) -> None:
        print(printable(f"  {label:<16}{text}"))

    print(printable(m["display"]))
    out("is", f"{m['family'] or '-'} {m['kind'] or '-'}"
        + (f" ({', '.join(m['variants'])})" if m["variants"] else "")
        + (f", {m['layout']} layout" if m["layout"] else ""))
    out("verdict", m["verdict"])
    out("size", f"{human_bytes(m['size'])}, {m['dtype'] or '-'}"
        + (f", {m['quantization']}" if m["quantization"] else ""))
    if m["title"]:
        out("title", m["title"])
    if m["base_model"]:
        out("base model", m["base_model"])
    for key, value in m["hashes"].items():
        out(key, value or "-")
    for c in m["components"]:
        also = f"; also in {len(c['also_in'])} other file(s)" if c["also_in"] else ""
        out(c["name"], f"{c['digest'][:16]}  {human_bytes(c['bytes'])}{also}")
    for s in m["sidecars"]:
        out(s["kind"], s["display"])
    for d in m["duplicates"]:
        out(f"same {d['same']}", d["display"])
    for p in m["parents"]:
        out(p["relation"], _node_text(p))
    for c in m["children"]:
        out(f"child ({c['relation']})", c["display"])
    for note in m["notes"]:
        out("note", note)
    return 0


# --- dupes ---------------------------------------------------------------------------------


def _add_dupes(sub) -> None:
    _query_parser(sub, "dupes", _dupes,
                  help="identical files, same weights, shared components",
                  description="Files with the same bytes; files with the same weights in "
                              "another format, layout or with other metadata; and components "
                              "(a VAE, a text encoder) found in files of different weights; "
                              "each with the bytes one copy would save.")


def _dupes(args) -> int:
    with _reading(args) as conn:
        found = queries.duplicates(conn)
    if args.json:
        print(json_dumps(found))
        return 0
    sections = (("identical", "identical files", lambda g: f"sha256 {g['sha256'][:16]}, "
                 + ("one file under several names" if g["copies"] == 1 else
                    f"{g['copies']} copies")),
                ("same_weights", "same weights", lambda g: "+".join(g["components"])),
                ("shared_components", "shared components",
                 lambda g: f"{g['component']} {g['digest'][:16]}"))
    for key, title, label in sections:
        groups = found[key]
        print(f"{title}: {len(groups)} group(s), "
              f"{human_bytes(found['saved_bytes'][key])} could be saved")
        for g in groups:
            print(printable(f"  {label(g)} ({human_bytes(g['saved_bytes'])} to save)"))
            for f in g["files"]:
                print(printable(f"    {f['display']}"))
    return 0


# --- lineage -------------------------------------------------------------------------------


def _add_lineage(sub) -> None:
    _query_parser(sub, "lineage", _lineage, given=("file", "FILE_OR_ID"),
                  help="the merges and LoRAs a file came from, as a tree",
                  description="The ancestry a file's metadata records (ckptkit's, "
                              "AUTOMATIC1111's sd_merge_recipe, sd-mecha's recipe, kohya's "
                              "training base model), with each parent resolved to the "
                              "library's files by hash, else by name.")


def _lineage(args) -> int:
    with _reading(args) as conn:
        m = _model(conn, args.file)
        tree = queries.lineage(conn, m["id"])
    if args.json:
        print(json_dumps(tree))
        return 0
    print(printable(tree["file"]["display"]))
    _print_tree(tree["parents"], "")
    if not tree["parents"]:
        print("  (no ancestry recorded in its metadata)")
    return 0


def _node_text(node: dict[str, Any]) -> str:
    files = node["files"]
    where = (files[0]["display"] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
             + (" [by name]" if files[0]["match"] == "name" else "")) if files \
        else "not in the library"
    named = node["name"] or (f"{node['hash_kind']} {node['hash'][:12]}" if node["hash"] else "?")
    return f"{named}: {where}"


def _print_tree(nodes: list[dict[str, Any]], indent: str) -> None:
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        print(printable(f"{indent}{'└─ ' if last else '├─ '}{node['relation']}: "
                        f"{_node_text(node)}" + (" (loop)" if node.get("loop") else "")))
        _print_tree(node["parents"], indent + ("   " if last else "│  "))


SUBCOMMANDS = (_add_scan, _add_list, _add_find, _add_show, _add_dupes, _add_lineage,
               library_serve_cmd.add_parser)

__all__ = ["SUBCOMMANDS", "add_db_option", "add_parser"]
