"""Where an output came from, in its metadata: operation, options, source files, version.

Added to (never replacing) the source's own metadata, under ``ckptkit.*`` keys, so that a
file says how it was made and from what, whichever tool reads it later.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import __version__


def provenance(operation: str, sources: list[str], **options: Any) -> dict[str, str]:
    meta = {"ckptkit.version": __version__, "ckptkit.operation": operation,
            "ckptkit.sources": json.dumps([os.path.basename(s) for s in sources])}
    meta.update({f"ckptkit.{k}": v if isinstance(v, str) else json.dumps(v)
                 for k, v in options.items()})
    return meta
