"""Reading the library back: plain dicts and lists, ready for ``--json`` or a web page.

Every function takes an open connection (``db.open_library``) and returns data only: file
paths as ``str`` (``os.fsdecode`` of the bytes stored), JSON columns decoded. ``summary`` is
the shape of one file in every list; ``model`` adds everything known about one file.

Lineage entries name their parents by hash (SHA-256, AutoV1, AutoV2) or file name;
``resolve`` finds the files of the library they mean. A hash names a file exactly; a name
may match several files, or the wrong one, and says so (``match: "name"``).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections import defaultdict
from typing import Any

from ..arch.families import families
from ..lora.families import ALL_FAMILIES as LORA_FAMILIES

# The families a file can be indexed under: a checkpoint's or part's, or a LoRA's ("flux1"
# for both FLUX.1 models), for ``ckpt library list --family``.
FAMILIES = tuple(dict.fromkeys((*families(), *LORA_FAMILIES)))
MAX_LINEAGE_DEPTH = 12
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")

_SUMMARY = ("id", "display", "name", "size", "mtime_ns", "kind", "family", "variants",
            "layout", "dtype", "quantization", "verdict", "base_model", "title", "sha256",
            "autov1", "autov2", "autov3", "crc32", "blake3", "format")


def _decode(value: Any, default: Any) -> Any:
    if value is None:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


def summary(row: sqlite3.Row, preview: str | None = None) -> dict[str, Any]:
    """One file as every list shows it."""
    columns = row.keys()  # (``k in row`` would look among the values)
    out = {k: row[k] for k in _SUMMARY if k in columns}
    out["path"] = os.fsdecode(row["path"])
    out["variants"] = _decode(row["variants"], [])
    out["preview"] = preview
    return out


def _previews(conn: sqlite3.Connection, ids: list[int] | None = None) -> dict[int, str]:
    """The preview image of each file (the first found, in ``sidecars.candidates`` order)."""
    query = "SELECT file_id, path FROM sidecars WHERE kind = 'preview' ORDER BY rowid"
    found: dict[int, str] = {}
    for row in conn.execute(query):
        if ids is None or row["file_id"] in ids:
            found.setdefault(row["file_id"], os.fsdecode(row["path"]))
    return found


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_models(conn: sqlite3.Connection, *, kind: str | None = None,
                family: str | None = None, base: str | None = None,
                verdict: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """Every file, sorted by path, filtered: ``kind`` and ``verdict`` exactly, ``family``
    exactly (``sd1``, ``sdxl``...; a part that fits several families, stored as "sd1,sd2",
    is listed under each), ``base`` (a substring of the base model or the family), ``name``
    (a substring of the file name, the path or the title); all case-insensitive."""
    where, args = [], []
    if kind:
        where.append("lower(kind) = lower(?)")
        args.append(kind)
    if family:
        where.append("instr(',' || lower(family) || ',', ',' || lower(?) || ',') > 0")
        args.append(family)
    if verdict:
        where.append("lower(verdict) = lower(?)")
        args.append(verdict)
    if base:
        where.append("(base_model LIKE ? ESCAPE '\\' OR family LIKE ? ESCAPE '\\')")
        args += [_like(base)] * 2
    if name:
        where.append("(display LIKE ? ESCAPE '\\' OR title LIKE ? ESCAPE '\\')")
        args += [_like(name)] * 2
    sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
    rows = conn.execute(sql + " ORDER BY display", args).fetchall()
    previews = _previews(conn)
    return [summary(r, previews.get(r["id"])) for r in rows]


def find(conn: sqlite3.Connection, text: str) -> list[dict[str, Any]]:
    """Files a hash or a name names: hex of 8 to 64 digits is looked up as every hash
    (SHA-256, AutoV2 and BLAKE3 by prefix, AutoV1, CRC-32, AutoV3 by prefix: A1111 shows 12
    digits of it) and as a component's content digest (prefix); other text as a name.
    Each file found says ``matched``: which hash, or ``name``."""
    text = text.strip()
    if not _HEX.fullmatch(text):
        return [{**m, "matched": "name"} for m in list_models(conn, name=text)]
    h = text.lower()
    found: dict[int, dict[str, Any]] = {}
    previews = _previews(conn)
    checks = [("sha256", "sha256 LIKE ?", h + "%"), ("autov3", "autov3 LIKE ?", h + "%"),
              ("blake3", "blake3 LIKE ?", h + "%"), ("autov1", "autov1 = ?", h),
              ("crc32", "crc32 = ?", h)]
    for label, condition, value in checks:
        for row in conn.execute(f"SELECT * FROM files WHERE {condition}", (value,)):
            found.setdefault(row["id"], {**summary(row, previews.get(row["id"])),
                                         "matched": label})
    for row in conn.execute("SELECT f.*, c.name AS component FROM components c "
                            "JOIN files f ON f.id = c.file_id WHERE c.digest LIKE ?",
                            (h + "%",)):
        found.setdefault(row["id"], {**summary(row, previews.get(row["id"])),
                                     "matched": f"{row['component']} content digest"})
    return sorted(found.values(), key=lambda m: m["display"])


def _row(conn: sqlite3.Connection, key: int | str) -> sqlite3.Row | None:
    """A file by id, or by path (as given, or absolute, or real)."""
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()
                                and not os.path.exists(key)):
        return conn.execute("SELECT * FROM files WHERE id = ?", (int(key),)).fetchone()
    for path in dict.fromkeys((os.path.abspath(key), os.path.realpath(key))):
        row = conn.execute("SELECT * FROM files WHERE path = ?", (os.fsencode(path),)).fetchone()
        if row is not None:
            return row
    return None


def model(conn: sqlite3.Connection, key: int | str) -> dict[str, Any] | None:
    """Everything about one file (by id or path), or None: its summary and ``hashes``,
    ``identification``, ``components`` (each with the other files that hold the same one),
    ``metadata`` (decoded) and its ``sections``, ``sidecars`` (each with its content and what
    it says), ``preview``, ``duplicates`` (files with the same bytes or the same weights),
    ``parents`` (the lineage entries recorded in it, resolved) and ``children`` (files
    whose lineage names this one)."""
    from .metadata import sections
    from .sidecars import described

    row = _row(conn, key)
    if row is None:
        return None
    file_id = row["id"]
    out = summary(row, _previews(conn, [file_id]).get(file_id))
    out["hashes"] = {k: row[k] for k in ("sha256", "autov1", "autov2", "autov3", "crc32",
                                         "blake3")}
    out.update(tensors=row["tensors"], parameters=row["parameters"],
               reasons=_decode(row["reasons"], []), notes=_decode(row["notes"], []),
               identification=_decode(row["identification"], None),
               metadata=_decode(row["metadata"], {}),
               indexed_at=row["indexed_at"], hashed_at=row["hashed_at"])
    out["sections"] = sections(out["metadata"])
    out["components"] = []
    for comp in conn.execute("SELECT * FROM components WHERE file_id = ? ORDER BY rowid",
                             (file_id,)):
        others = conn.execute(
            "SELECT f.id, f.display FROM components c JOIN files f ON f.id = c.file_id "
            "WHERE c.digest = ? AND c.file_id != ? ORDER BY f.display",
            (comp["digest"], file_id)).fetchall()
        out["components"].append({"name": comp["name"], "digest": comp["digest"],
                                  "tensors": comp["tensors"], "bytes": comp["bytes"],
                                  "also_in": [{"id": o["id"], "display": o["display"]}
                                              for o in others]})
    out["sidecars"] = []
    for side in conn.execute("SELECT * FROM sidecars WHERE file_id = ? ORDER BY rowid",
                             (file_id,)):
        content = _decode(side["content"], None)
        out["sidecars"].append({"kind": side["kind"], "path": os.fsdecode(side["path"]),
                                "display": side["display"], "size": side["size"],
                                "content": content, "says": described(side["kind"], content)})
    out["duplicates"] = _duplicates_of(conn, row)
    out["parents"] = lineage(conn, file_id, depth=1)["parents"]
    out["children"] = children(conn, file_id)
    return out


def _weights_key(conn: sqlite3.Connection, file_id: int) -> tuple:
    return tuple(conn.execute("SELECT name, digest FROM components WHERE file_id = ? "
                              "ORDER BY name", (file_id,)).fetchall())


def _duplicates_of(conn: sqlite3.Connection, row: sqlite3.Row) -> list[dict[str, Any]]:
    out = []
    if row["sha256"]:
        for other in conn.execute("SELECT * FROM files WHERE sha256 = ? AND id != ?",
                                  (row["sha256"], row["id"])):
            out.append({**summary(other), "same": "bytes"})
    mine = _weights_key(conn, row["id"])
    if mine:
        first = mine[0]
        candidates = conn.execute("SELECT DISTINCT file_id FROM components WHERE digest = ? "
                                  "AND file_id != ?", (first[1], row["id"])).fetchall()
        seen = {d["id"] for d in out}
        for (other_id,) in candidates:
            if other_id not in seen and tuple(map(tuple, _weights_key(conn, other_id))) \
                    == tuple(map(tuple, mine)):
                other = conn.execute("SELECT * FROM files WHERE id = ?", (other_id,)).fetchone()
                out.append({**summary(other), "same": "weights"})
    return out


def duplicates(conn: sqlite3.Connection) -> dict[str, Any]:
    """``identical``: groups of files with the same bytes (SHA-256), with how many
    ``copies`` of them are on disk (by device and inode); ``same_weights``:
    groups of files, not all identical, whose components all have the same content digests
    (the same model as ``.ckpt`` and ``.safetensors``, in another layout, with other
    metadata); ``shared_components``: components (by content digest) found in files of
    different weights (two merges with the same VAE); each with the bytes that keeping one
    copy would save, and the totals."""
    rows = {r["id"]: r for r in conn.execute("SELECT * FROM files")}
    by_sha: dict[str, list[int]] = defaultdict(list)
    for r in rows.values():
        if r["sha256"]:
            by_sha[r["sha256"]].append(r["id"])
    # Names of one file (hard links, a folder reached through a link) are no copies:
    # deleting one saves nothing, or deletes the file the other name shows.
    copies = {sha: len({(rows[i]["device"], rows[i]["inode"]) for i in ids})
              for sha, ids in by_sha.items()}
    identical = [{"sha256": sha, "size": rows[ids[0]]["size"], "copies": copies[sha],
                  "saved_bytes": rows[ids[0]]["size"] * (copies[sha] - 1),
                  "files": [summary(rows[i]) for i in sorted(ids, key=lambda i:
                                                             rows[i]["display"])]}
                 for sha, ids in by_sha.items() if len(ids) > 1]
    comps: dict[int, list[sqlite3.Row]] = defaultdict(list)
    for c in conn.execute("SELECT * FROM components ORDER BY name"):
        comps[c["file_id"]].append(c)
    by_weights: dict[tuple, list[int]] = defaultdict(list)
    for file_id, items in comps.items():
        by_weights[tuple((c["name"], c["digest"]) for c in items)].append(file_id)
    same_weights = []
    for key, ids in by_weights.items():
        if len(ids) > 1 and len({rows[i]["sha256"] for i in ids}) > 1:
            weight_bytes = sum(c["bytes"] for c in comps[ids[0]])
            distinct = {rows[i]["sha256"]: i for i in ids}
            same_weights.append({
                "components": [name for name, _ in key], "bytes": weight_bytes,
                "saved_bytes": weight_bytes * (len(distinct) - 1),
                "files": [summary(rows[i]) for i in sorted(ids, key=lambda i:
                                                           rows[i]["display"])]})
    # shared components: between weight groups (one file stands for each group)
    holders: dict[str, dict[tuple, sqlite3.Row]] = defaultdict(dict)
    group_files: dict[tuple, list[int]] = {}
    for key, ids in by_weights.items():
        group_files[key] = ids
        for c in comps[ids[0]]:
            holders[c["digest"]][key] = c
    shared = []
    for digest, groups in holders.items():
        if len(groups) < 2:
            continue
        first = next(iter(groups.values()))
        files = sorted({i for key in groups for i in group_files[key]},
                       key=lambda i: rows[i]["display"])
        shared.append({"digest": digest, "component": first["name"], "bytes": first["bytes"],
                       "tensors": first["tensors"],
                       "saved_bytes": first["bytes"] * (len(groups) - 1),
                       "files": [summary(rows[i]) for i in files]})
    shared.sort(key=lambda s: -s["saved_bytes"])
    return {"identical": identical, "same_weights": same_weights,
            "shared_components": shared,
            "saved_bytes": {"identical": sum(g["saved_bytes"] for g in identical),
                            "same_weights": sum(g["saved_bytes"] for g in same_weights),
                            "shared_components": sum(g["saved_bytes"] for g in shared)}}


def resolve(conn: sqlite3.Connection, hash_kind: str | None, value: str | None,
            name: str | None) -> list[dict[str, Any]]:
    """The files of the library a lineage entry means: by its hash when it has one (and a
    file has it), else by file name (exact, else the same name without extension)."""
    queries = {"sha256": "sha256 = ?", "autov1": "autov1 = ?", "autov2": "sha256 LIKE ?",
               "autov3": "autov3 = ?"}
    if hash_kind in queries and value:
        arg = value + "%" if hash_kind == "autov2" else value
        rows = conn.execute(f"SELECT * FROM files WHERE {queries[hash_kind]} ORDER BY display",
                            (arg,)).fetchall()
        if rows:
            return [{**summary(r), "match": hash_kind} for r in rows]
    if name:
        rows = conn.execute("SELECT * FROM files WHERE name = ? ORDER BY display",
                            (name,)).fetchall()
        if not rows:
            stem = os.path.splitext(name)[0]
            rows = [r for r in conn.execute("SELECT * FROM files WHERE name LIKE ? ESCAPE '\\'",
                                            (_like(stem)[1:],))
                    if os.path.splitext(r["name"])[0] == stem]
        return [{**summary(r), "match": "name"} for r in rows]
    return []


def lineage(conn: sqlite3.Connection, key: int | str, depth: int = MAX_LINEAGE_DEPTH
            ) -> dict[str, Any]:
    """The ancestry of a file as a tree: ``{"file": summary, "parents": [node, ...]}``, each
    node an entry of its metadata (``relation``, ``name``, ``hash_kind``, ``hash``,
    ``source``, ``detail``) with ``files`` (the library's files it resolves to) and its own
    ``parents``: those the resolved file records, else those recorded for it in this file's
    metadata (A1111's ``sd_merge_models``, ckptkit's ``merge_lineage``). A file met again
    on the way down (a loop) is not expanded twice."""
    row = _row(conn, key)
    if row is None:
        raise KeyError(key)
    return {"file": summary(row), "parents": _parents(conn, row["id"], depth, {row["id"]})}


def _parents(conn: sqlite3.Connection, file_id: int, depth: int, seen: set[int]
             ) -> list[dict[str, Any]]:
    entries = conn.execute("SELECT * FROM ancestry WHERE file_id = ? ORDER BY seq",
                           (file_id,)).fetchall()
    nodes = {}
    for e in entries:
        nodes[e["seq"]] = {"relation": e["relation"], "name": e["name"],
                           "hash_kind": e["hash_kind"], "hash": e["hash"],
                           "source": e["source"], "detail": _decode(e["detail"], {}),
                           "files": [f for f in resolve(conn, e["hash_kind"], e["hash"],
                                                        e["name"]) if f["id"] != file_id],
                           "parents": []}
    roots = []
    for e in entries:
        node = nodes[e["seq"]]
        if e["parent_seq"] is None or e["parent_seq"] not in nodes:
            roots.append(node)
        else:
            nodes[e["parent_seq"]]["parents"].append(node)
    if depth > 1:
        for node in nodes.values():
            found = [f["id"] for f in node["files"] if f["match"] != "name"] or \
                    [f["id"] for f in node["files"]][:1]
            for other in found:
                if other in seen:
                    node["loop"] = True
                    continue
                below = _parents(conn, other, depth - 1, seen | {other})
                if below:
                    node["parents"] = below
                    break
    return roots


def children(conn: sqlite3.Connection, file_id: int) -> list[dict[str, Any]]:
    """Files of the library whose metadata names this one as a direct parent (by a hash it
    has, or its name); a parent's parent recorded in a file is not its child."""
    row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
    if row is None:
        return []
    conditions = [f"(a.hash_kind = '{kind}' AND a.hash = ?)"
                  for kind in ("sha256", "autov1", "autov2", "autov3")]
    conditions.append("(a.hash IS NULL AND a.name = ?)")
    args = [row["sha256"], row["autov1"], (row["sha256"] or "")[:10], row["autov3"],
            row["name"]]
    found = conn.execute(
        "SELECT DISTINCT f.*, a.relation FROM ancestry a JOIN files f ON f.id = a.file_id "
        f"WHERE ({' OR '.join(conditions)}) AND a.parent_seq IS NULL AND a.file_id != ? "
        "ORDER BY f.display",
        [*args, file_id]).fetchall()
    return [{**summary(r), "relation": r["relation"]} for r in found]
