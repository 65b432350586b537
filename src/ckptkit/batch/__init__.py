"""``ckpt batch``: scan, identify or hash every file of a listing, one Parquet row per file.

Made for a model store: millions of files, checked as they arrive and again whenever the
scanner improves. The per-file work is the ops every other command uses (``batch.work``),
done in child processes under a per-file time limit (``batch.pool``), on one machine or on a
Ray cluster through Ray Data (``batch.on_ray``), with the same rows either way.

Operations: ``scan`` (``ops.scan.scan_file``: verdict and findings), ``inspect`` (the scan,
then ``ops.inspect.inspect_file`` on safe files: what the file is; no hashes), ``hash`` (the
scan, then a separate full-read stage: ``ops.model_hash.hash_file``, as ``ckpt hash``).

Results schema (``rows.schema``), one row per file, sorted by the bytes of the path:

- ``path`` string: the path as listed (a byte that is not UTF-8 written ``\\xNN``);
  ``path_bytes`` binary: the exact bytes, set only when the name is not UTF-8
- ``size`` int64, ``mtime`` timestamp[ns, UTC]: as the listing stat'ed the file (null when
  it could not be)
- ``verdict`` string: ``safe``, ``unsafe``, ``error`` or ``skipped`` (``ckpt scan``'s)
- ``format`` string (``safetensors``, ``torch-zip``, ...), ``tensors`` int64
- ``findings`` list<struct<kind, message, where, offset int64, why>>: ``ckpt scan``'s
  reasons (refused globals with the pickle and byte offset, notes), at most 64
- ``kind``, ``family``, ``variant`` (comma-separated), ``layout`` strings, ``components``
  list<string>, ``quantization`` string (how the weights are stored below 16 bits, as
  ``ckpt library`` names it: ``scaled-fp8``, ``Q4_K``, ``NF4``, ``f8_e4m3``...):
  ``inspect`` only, null otherwise
- ``sha256``, ``autov1``, ``autov2``, ``autov3``, ``crc32``, ``blake3`` strings and
  ``component_digests`` map<string, string> (each component's content digest, the same in
  any format or layout): ``hash`` only
- ``error`` string: why a stage failed (the file's read error, "timed out after S s", "the
  reader crashed twice (...)", "hashing: ..."); null when every stage succeeded

Text from files goes through ``safe_text.json_text`` and is cut at 1,000 characters; nothing
else of a file's content is kept.

Faults: a file still running after ``--timeout`` seconds (the hash stage: plus one second
per 16 MiB) has its child killed and gets an ``error`` row; a child that dies loses only the
file it was on, which is retried once alone and then gets an ``error`` row; on Ray, an actor
that dies has its batch run again. Rows are written as the run goes (``batch.results``); an
interrupted run is finished by ``--resume``, which skips files already done with the same
size and mtime.
"""

from .run import Summary, run_batch

__all__ = ["Summary", "run_batch"]
