"""The model library: an SQLite index of every model file under some folders.

``db`` opens (creates, migrates) the database; ``index`` scans folders into it, rehashing
only files that changed; ``queries`` reads it back as plain dicts (what ``ckpt library``
prints and what its web page shows); ``metadata`` and ``sidecars`` read what a file and the
other tools' files beside it say about a model. At the ops level: it uses ``ops`` (scan,
inspect, hashing) and is used by ``cli``.
"""
