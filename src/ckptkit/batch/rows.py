"""One result row per file: its columns, built from the ops' reports, and their Parquet schema.

Rows are plain dicts until they are written, so that the children that build them need no
pyarrow. Every string that comes from a file (a finding quoting a global, a metadata-derived
family name, an error quoting a header) goes through ``safe_text.json_text`` (valid UTF-8:
Parquet strings must be) and is cut at ``MAX_TEXT`` characters; a file's findings are cut at
``MAX_FINDINGS`` (a hostile pickle can name a million globals), the last one saying how many
were left out. Nothing else from a file's content is kept.
"""

from __future__ import annotations

import os
from typing import Any

from ..ops.inspect import quantization_label
from ..ops.scan import ERROR, ScanResult
from ..safe_text import has_surrogates, json_text

MAX_TEXT = 1000
MAX_FINDINGS = 64
HASHES = ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")  # model_hash.HASH_KEYS

COLUMNS = ("path", "path_bytes", "size", "mtime", "verdict", "format", "tensors", "findings",
           "kind", "family", "variant", "layout", "components", "quantization", *HASHES,
           "component_digests", "error")


def clip(text: str) -> str:
    text = json_text(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _opt(text: Any) -> str | None:
    return None if text is None else clip(str(text))


def empty(path: str, size: int | None, mtime_ns: int | None) -> dict[str, Any]:
    """A row with only the file's name and stat filled in."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["path"] = json_text(path)
    row["path_bytes"] = os.fsencode(path) if has_surrogates(path) else None
    row["size"], row["mtime"] = size, mtime_ns
    return row


def error_row(path: str, size: int | None, mtime_ns: int | None, message: str
              ) -> dict[str, Any]:
    row = empty(path, size, mtime_ns)
    row["verdict"], row["error"] = ERROR, clip(message)
    return row


def from_scan(result: ScanResult, size: int | None, mtime_ns: int | None) -> dict[str, Any]:
    row = empty(result.path, size, mtime_ns)
    row["verdict"], row["format"], row["tensors"] = result.verdict, result.format, result.tensors
    reasons = result.reasons
    findings = [{"kind": clip(r["kind"]), "message": clip(r["message"]),
                 "where": _opt(r["where"]), "offset": r["offset"], "why": _opt(r["why"])}
                for r in reasons[:MAX_FINDINGS]]
    if len(reasons) > MAX_FINDINGS:
        findings[-1] = {"kind": "limit", "where": None, "offset": None, "why": None,
                        "message": f"and {len(reasons) - MAX_FINDINGS + 1} more findings "
                                   "(ckpt scan lists them all)"}
    row["findings"] = findings
    if result.verdict == ERROR and reasons:
        row["error"] = clip(reasons[0]["message"])
    return row


def add_identification(row: dict[str, Any], report: dict[str, Any]) -> None:
    """``inspect``'s answers: kind, family, variants, layout, component names, and the
    quantization as the library names it (``ops.inspect.quantization_label``: ``scaled-fp8``,
    ``Q4_0``, ``NF4``, ``f8_e4m3``...)."""
    ident = report["identification"]
    row["kind"], row["family"] = _opt(ident["kind"]), _opt(ident["family"])
    row["variant"] = _opt(",".join(ident["variants"])) if ident["variants"] else None
    row["layout"] = _opt(ident["layout"])
    row["components"] = [clip(c["name"]) for c in ident["components"]]
    row["quantization"] = _opt(quantization_label(report, ident["extra"]))


def hash_columns(hashed: dict[str, Any]) -> dict[str, Any]:
    """``ops.model_hash.hash_file``'s answer as columns: the file hashes, and each
    component's content digest by component name (sorted)."""
    return {**{name: hashed[name] for name in HASHES},
            "component_digests": sorted(hashed["components"].items())}


def schema():
    """The Parquet schema of the results (pyarrow imported here: the children need none)."""
    import pyarrow as pa

    finding = pa.struct([("kind", pa.string()), ("message", pa.string()),
                         ("where", pa.string()), ("offset", pa.int64()), ("why", pa.string())])
    return pa.schema([
        ("path", pa.string()), ("path_bytes", pa.binary()), ("size", pa.int64()),
        ("mtime", pa.timestamp("ns", tz="UTC")), ("verdict", pa.string()),
        ("format", pa.string()), ("tensors", pa.int64()), ("findings", pa.list_(finding)),
        ("kind", pa.string()), ("family", pa.string()), ("variant", pa.string()),
        ("layout", pa.string()), ("components", pa.list_(pa.string())),
        ("quantization", pa.string()), *[(h, pa.string()) for h in HASHES],
        ("component_digests", pa.map_(pa.string(), pa.string())), ("error", pa.string())])


def table(batch: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(batch, schema=schema())
