"""Where an output came from, in its metadata: operation, options, source files, version.

Added to (never replacing) the source's own metadata, under ``ckptkit.*`` keys, so that a
file says how it was made and from what, whichever tool reads it later. The sources' SHA-256
(``ckptkit.sources_sha256``, in the order of ``ckptkit.sources``) are those already known
(remembered from an earlier hash), or, when asked (``--hash``; always for merges, whose
recipes need them), computed in a worker thread while the operation runs and written into
the header when the data is done: hashing a 24 GB input takes longer than pruning it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .. import __version__
from ..engine.writer import Deferred
from .hashing import BackgroundSha256, cached_sha256

_PENDING = "0" * 64  # a SHA-256 not known yet: the same length as the one that replaces it


def source_hashes(sources: list[str], compute: bool = False,
                  job: BackgroundSha256 | None = None) -> str | Deferred:
    """The sources' SHA-256 as a JSON list: those ckptkit remembers (null where not known),
    or with ``compute`` every one, hashed in a worker thread while the operation runs (a
    value the writer fills in at the end; ``job`` shares hashing already started)."""
    if not compute:
        return json.dumps([cached_sha256(s) for s in sources])
    job = job or BackgroundSha256(sources)

    def resolve() -> str:
        found = job.result()
        return json.dumps([found.get(s) for s in sources])

    return Deferred(json.dumps([_PENDING] * len(sources)), resolve, job.cancel)


# Metadata that hashes the bytes of the file it is in (ModelSpec's, kohya's): false of any
# output made from that file, which has bytes of its own.
FILE_HASH_KEYS = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")


def inherited(metadata: Mapping[str, str], also: Iterable[str] = ()) -> dict[str, str]:
    """A source's metadata as an output made from it may say it: less the hashes of the
    source's own bytes (``FILE_HASH_KEYS``) and the keys ``also``."""
    left = {*FILE_HASH_KEYS, *also}
    return {k: v for k, v in metadata.items() if k not in left}


def provenance(operation: str, sources: list[str], hashes: str | Deferred | None = None,
               **options: Any) -> dict[str, Any]:
    """The ``ckptkit.*`` keys; ``hashes`` (from ``source_hashes``) defaults to the hashes
    already known."""
    meta: dict[str, Any] = {
        "ckptkit.version": __version__, "ckptkit.operation": operation,
        "ckptkit.sources": json.dumps([os.path.basename(s) for s in sources]),
        "ckptkit.sources_sha256": hashes if hashes is not None else source_hashes(sources)}
    meta.update({f"ckptkit.{k}": v if isinstance(v, str) else json.dumps(v)
                 for k, v in options.items()})
    return meta
