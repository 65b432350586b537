"""What each page shows, from the library's query API (``library.queries``): the dicts it
returns, put in the shape the templates draw. The one query of its own is
``preview_path``: the preview image of one file, without everything ``queries.model``
gathers (an image request should not trace a lineage).

A connection is opened per request (``library``) and closed after it: waitress answers
requests on several threads, the database is in WAL mode, so pages read while a scan
writes, and a database replaced under the server (a new scan into a new file) is seen at
the next request.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from ...cli.fmt import human_bytes
from ...safe_text import printable
from .. import queries
from ..db import database_errors, open_library
from .graph import Ancestor, layout

# The index table's columns with a choice of values to filter on: (key, label).
CHOICES = (("kind", "kind"), ("family", "family"), ("base_model", "base model"),
           ("verdict", "verdict"))
# Its columns: (key, label, CSS classes of its cells).
COLUMNS = (("name", "name", ""), ("folder", "folder", "mono muted"), *(
    (key, label, "") for key, label in CHOICES), ("format", "format", ""),
    ("size", "size", "num nowrap"), ("mtime", "modified", "nowrap"),
    ("autov2", "AutoV2", "mono nowrap"))
HASH_NAMES = {"sha256": "SHA-256", "autov1": "AutoV1", "autov2": "AutoV2", "autov3": "AutoV3",
              "crc32": "CRC32", "blake3": "BLAKE3"}
MAX_VALUE_CHARS = 20_000  # a metadata value longer than this is cut (a page stays bounded)


@contextlib.contextmanager
def library(db_path: str) -> Iterator[sqlite3.Connection]:
    """The index, open for one request; its failures as one ``CkptError`` sentence."""
    with database_errors(db_path):
        conn = open_library(db_path, create=False)
        try:
            yield conn
        finally:
            conn.close()


def check(db_path: str) -> None:
    """Raises the one-line error of a database that is missing, corrupt, or too new."""
    with library(db_path) as conn:
        conn.execute("SELECT count(*) FROM files").fetchone()


def _folder(display: str) -> str:
    return os.path.dirname(display)


def index_rows(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], list]:
    """The table's rows (for the page's script, as JSON: every string already through
    ``printable``, since the template's escaping does not reach into JSON), and for each
    filter column its label and the values present."""
    rows = []
    for m in queries.list_models(conn):
        row = {"name": m["name"], "folder": _folder(m["display"]), "kind": m["kind"] or "",
               "family": m["family"] or "", "base_model": m["base_model"] or "",
               "verdict": m["verdict"], "format": m["format"] or "",
               "size_text": human_bytes(m["size"]), "modified": _when(m["mtime_ns"] / 1e9),
               "autov2": m["autov2"] or ""}
        row = {k: printable(v) for k, v in row.items()}
        rows.append({**row, "id": m["id"], "size": m["size"], "mtime": m["mtime_ns"]})
    choices = [(key, label, sorted({r[key] for r in rows} - {""})) for key, label in CHOICES]
    return rows, choices


def preview_path(conn: sqlite3.Connection, file_id: int) -> str | None:
    """The preview image the index records for the file ``file_id`` (the first found, as
    ``queries`` chooses it), or None."""
    row = conn.execute("SELECT path FROM sidecars WHERE file_id = ? AND kind = 'preview' "
                       "ORDER BY rowid LIMIT 1", (file_id,)).fetchone()
    return os.fsdecode(row["path"]) if row else None


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=1, ensure_ascii=False)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + f"\u2026 ({len(text) - MAX_VALUE_CHARS:,} more characters)"
    return text


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


def _table(column: str, value: str | None) -> str | None:
    """The address of the index table filtered to ``column`` = ``value`` (as the table's
    choices write it: through ``printable``)."""
    return "/?" + urlencode({column: printable(value)}) if value else None


def _sampling(identification: dict[str, Any] | None) -> str:
    """The family's sampling defaults, in one line: "512x512, 50 steps, guidance 7.5"."""
    s = (identification or {}).get("sampling")
    if not isinstance(s, dict):
        return ""
    size = s.get("resolution")
    parts = ["x".join(map(str, size)) if isinstance(size, list) else "",
             f"{s['steps']} steps" if s.get("steps") else "",
             f"guidance {s['guidance']}" if s.get("guidance") is not None else "",
             str(s.get("prediction") or ""), str(s.get("scheduler") or "")]
    return ", ".join(p for p in parts if p)


def _facts(m: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, value, link to the table filtered on it) of what the model is."""
    said: dict[str, Any] = {}
    for side in m["sidecars"]:
        for key, value in side["says"].items():
            said.setdefault(key, value)
    facts: list[tuple[str, Any, str | None]] = [
        ("title", m["title"] or said.get("title"), None),
        ("kind", m["kind"], _table("kind", m["kind"])),
        ("family", m["family"], _table("family", m["family"])),
        ("base model", m["base_model"] or said.get("base_model"),
         _table("base_model", m["base_model"])),
        ("variants", ", ".join(m["variants"]), None),
        ("layout", m["layout"], None),
        ("format", m["format"], None),
        ("dtype", m["dtype"], None),
        ("quantization", m["quantization"], None),
        ("size", f"{m['size']:,} bytes", None),
        ("tensors", f"{m['tensors']:,}" if m["tensors"] is not None else None, None),
        ("parameters", f"{m['parameters']:,}" if m["parameters"] is not None else None, None),
        ("scan verdict", m["verdict"] + (": " + "; ".join(map(str, m["reasons"]))
                                         if m["reasons"] else ""),
         _table("verdict", m["verdict"])),
        ("trigger words", ", ".join(said.get("trigger_words") or []), None),
        ("sampling", _sampling(m["identification"]), None),
        ("modified", _when(m["mtime_ns"] / 1e9), None),
        ("indexed", _when(m["indexed_at"]), None),
    ]
    facts += [("note", note, None) for note in m["notes"]]
    return [(label, str(value), link) for label, value, link in facts if value]


def _metadata(m: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The metadata in the query API's groups, then every key no group took."""
    titles = {"modelspec": "ModelSpec", "training": "training (kohya)",
              "recipes": "merge recipes and lineage", "ckptkit": "ckptkit provenance"}
    groups, grouped = [], set()
    for key, items in m["sections"].items():
        full = {f"modelspec.{k}" if key == "modelspec" else k: v for k, v in items.items()}
        shown = [(k, _text(v)) for k, v in full.items() if k not in grouped]
        grouped.update(full)
        if shown:  # a key in two groups (ckptkit's merge recipe) is shown in the first
            groups.append((titles.get(key, key), shown))
    rest = [(k, _text(v)) for k, v in m["metadata"].items() if k not in grouped]
    if rest:
        groups.append(("other", rest))
    return groups


def _name(display: str) -> str:
    return os.path.basename(display)


def _duplicates(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Files with the same bytes or weights, then the files that share some components."""
    out = [{"id": d["id"], "name": d["name"], "path": d["display"], "how": f"same {d['same']}"}
           for d in m["duplicates"]]
    whole = {d["id"] for d in out}
    shared: dict[int, tuple[str, list[str]]] = {}
    for c in m["components"]:
        for o in c["also_in"]:
            if o["id"] not in whole:
                shared.setdefault(o["id"], (o["display"], []))[1].append(c["name"])
    out += [{"id": i, "name": _name(path), "path": path, "how": "shares " + ", ".join(names)}
            for i, (path, names) in shared.items()]
    return out


def _relation(node: dict[str, Any]) -> str:
    detail = node["detail"] if isinstance(node["detail"], dict) else {}
    parts = [node["relation"]]
    if isinstance(detail.get("input"), str):
        parts.append(detail["input"])
    methods = detail.get("methods")
    if isinstance(methods, list) and methods:
        parts.append("/".join(map(str, methods)))
    for key in ("weight", "alpha", "strength", "multiplier"):
        if isinstance(detail.get(key), (int, float, str)):
            parts.append(f"{key} {detail[key]}")
    return " ".join(parts)


def _ancestor(node: dict[str, Any], key: str) -> Ancestor:
    files = node["files"]
    exact = [f for f in files if f["match"] != "name"]
    hit = (exact or files or [None])[0]
    if hit is not None:
        name = hit["name"]
        detail = " ".join(filter(None, (hit["family"], hit["kind"])))
        if not exact:
            detail += " (matched by name)"
        model_id = hit["id"]
        key = f"file:{hit['id']}"
    else:
        name = node["name"] or f"{node['hash_kind']} {str(node['hash'])[:12]}"
        detail = "not in the library"
        model_id = None
    ancestor = Ancestor(key, name, detail, model_id)
    for i, parent in enumerate(node["parents"]):
        ancestor.sources.append((_ancestor(parent, f"{key}/{i}"), _relation(parent)))
    return ancestor


def _lineage(conn: sqlite3.Connection, m: dict[str, Any]):
    tree = queries.lineage(conn, m["id"])
    if not tree["parents"]:
        return None
    root = Ancestor(f"file:{m['id']}", m["name"],
                    " ".join(filter(None, (m["family"], m["kind"]))), m["id"])
    for i, node in enumerate(tree["parents"]):
        root.sources.append((_ancestor(node, f"entry:{i}"), _relation(node)))
    return layout(root)


def model_page(conn: sqlite3.Connection, file_id: int) -> dict[str, Any] | None:
    """Everything the page of one model shows, or None when the id is not in the index."""
    m = queries.model(conn, file_id)
    if m is None:
        return None
    dtypes = {}
    for comp in (m["identification"] or {}).get("components", []):
        if isinstance(comp, dict) and isinstance(comp.get("dtypes"), dict):
            dtypes[comp.get("name")] = ", ".join(comp["dtypes"])
    return {
        "id": m["id"], "name": m["name"], "path": m["display"], "preview": bool(m["preview"]),
        "facts": _facts(m),
        "reasons": [str(r) for r in (m["identification"] or {}).get("reasons", [])],
        "hashes": [(HASH_NAMES.get(k, k), v) for k, v in m["hashes"].items() if v],
        "components": [{"name": c["name"], "tensors": c["tensors"], "bytes": c["bytes"],
                        "digest": c["digest"], "dtypes": dtypes.get(c["name"], ""),
                        "shared": [{"id": o["id"], "name": _name(o["display"]),
                                    "path": o["display"]} for o in c["also_in"]]}
                       for c in m["components"]],
        "duplicates": _duplicates(m),
        "metadata": _metadata(m),
        "sidecars": [{"kind": s["kind"], "path": s["display"]} for s in m["sidecars"]],
        "lineage": _lineage(conn, m),
        "descendants": [{"id": c["id"], "name": c["name"], "path": c["display"],
                         "relation": c["relation"]} for c in m["children"]],
    }
