"""Where an output came from, in its metadata: operation, options, source files, version.

Added to (never replacing) the source's own metadata, under ``ckptkit.*`` keys, so that a
file says how it was made and from what, whichever tool reads it later. The sources' SHA-256
(``ckptkit.sources_sha256``, in the order of ``ckptkit.sources``) are computed in a worker
thread while the operation runs, and written into the header when the data is done.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import __version__
from ..engine.writer import Deferred
from .hashing import BackgroundSha256

_PENDING = "0" * 64  # a SHA-256 not known yet: the same length as the one that replaces it


def source_hashes(sources: list[str], render=json.dumps,
                  job: BackgroundSha256 | None = None) -> Deferred:
    """A metadata value that becomes ``render([sha256 of each source])`` once the sources are
    hashed (None for one that could not be read); ``job`` shares hashing already started."""
    job = job or BackgroundSha256(sources)

    def resolve() -> str:
        found = job.result()
        return render([found.get(s) for s in sources])

    return Deferred(render([_PENDING] * len(sources)), resolve, job.cancel)


def provenance(operation: str, sources: list[str], hashes: Deferred | None = None,
               **options: Any) -> dict[str, Any]:
    """The ``ckptkit.*`` keys; ``hashes`` shares one ``source_hashes`` between the outputs
    of one operation (a split's files)."""
    meta: dict[str, Any] = {
        "ckptkit.version": __version__, "ckptkit.operation": operation,
        "ckptkit.sources": json.dumps([os.path.basename(s) for s in sources]),
        "ckptkit.sources_sha256": hashes or source_hashes(sources)}
    meta.update({f"ckptkit.{k}": v if isinstance(v, str) else json.dumps(v)
                 for k, v in options.items()})
    return meta
