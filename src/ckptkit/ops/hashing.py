"""File hashes the community uses to name models, computed in one streamed pass.

``sha256`` (the full file; AUTOMATIC1111's "AutoV2" short hash is its first 10 hex digits)
and Civitai's "AutoV3" (the SHA-256 of what follows a safetensors header, which survives
metadata edits: bytes 8+N to the end when the first 8 bytes read as N < 16 MiB, else bytes 8
to the end, for every file type). The file is read in large chunks, never held in memory.
"""

from __future__ import annotations

import hashlib
import os
import struct

from ..engine.writer import Progress

CHUNK = 1 << 24


def file_hashes(path: str, progress: Progress | None = None) -> dict[str, str]:
    size = os.path.getsize(path)
    whole, after_header = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 1 << 63
        skip = 8 + n if n < 16 * 1024 * 1024 else 8
        f.seek(0)
        if progress:
            progress.start(size, 1)
        position = 0
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            if position + len(chunk) > skip:
                after_header.update(chunk[max(0, skip - position):])
            position += len(chunk)
            if progress:
                progress.update(len(chunk), 0)
    sha = whole.hexdigest()
    return {"sha256": sha, "autov2": sha[:10], "autov3": after_header.hexdigest()}
