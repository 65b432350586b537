"""``ckpt hash FILE...``: every community hash of each file and its components' digests.

One read of each file (``ops.model_hash``). Lowercase hex throughout; the CRC-32 in
Civitai's byte order (``ops.hashing``). A file that is no readable checkpoint still gets its
file hashes, with a note that it has no component digests; one that cannot be read at all is
an error (exit code 3 or 5 as usual) and the others are still hashed.
"""

from __future__ import annotations

from ..errors import CkptError, worse_exit
from ..ops.model_hash import HASH_KEYS, hash_file
from ..safe_text import json_dumps, printable
from .failure import report_failure
from .fmt import human_bytes
from .progress import add_output_options, progress_for

EPILOG = """hashes (lowercase hex):
  sha256   the whole file
  autov1   AUTOMATIC1111's old short hash: sha256 of the 64 KiB at offset 1 MiB, 8 digits
  autov2   AUTOMATIC1111's short hash: the first 10 digits of sha256
  autov3   Civitai's: sha256 of what follows a safetensors header (the metadata can
           change, it does not); A1111 shows its first 12 digits for LoRAs
  crc32    zlib's CRC-32, written as Civitai writes it (its 4 bytes little-endian)
  blake3   the whole file (Civitai, Stability Matrix)
components: a digest of each component's weights (canonical names, dtypes, shapes, bytes):
  the same in any format, layout, key order or metadata."""


def add_parser(commands) -> None:
    import argparse

    p = commands.add_parser(
        "hash", help="all the hashes model sites and UIs use, and each component's digest",
        description="For each file, in one read: SHA-256, AutoV1, AutoV2, AutoV3, CRC-32 and "
                    "BLAKE3 as AUTOMATIC1111, Civitai and Stability Matrix compute them, and "
                    "a content digest of each component (diffusion model, text encoders, "
                    "VAE) that is the same whatever the file's format or key layout.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE")
    add_output_options(p, json_help="one JSON object per file, per line")
    p.set_defaults(run=run)


def run(args) -> int:
    failed = 0
    for path in args.files:
        try:
            with progress_for(args, "hash", unit="files") as bar:
                found = hash_file(path, progress=bar)
        except (CkptError, OSError) as exc:  # an input that cannot be read: exit code 3
            code = None if isinstance(exc, CkptError) else 3
            failed = worse_exit(failed, report_failure(exc, args.json, path=path, code=code))
            continue
        if args.json:
            print(json_dumps({"path": path, **found}))
            continue
        print(printable(path))
        for key in HASH_KEYS:
            print(f"  {key:<9}{found[key]}")
        for name, digest in found["components"].items():
            size = found["component_sizes"][name]
            print(printable(f"  {name:<16}{digest}  ({size['tensors']:,} tensors, "
                            f"{human_bytes(size['bytes'])})"))
        for note in found["notes"]:
            print(printable(f"  note: {note}"))
    return failed
