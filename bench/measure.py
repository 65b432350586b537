"""Runs commands as child processes and reports wall time and the child's own peak RSS."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run(cmd: list[str], hash_cache: str | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (bytes) of one command; raises if it fails.

    The RSS comes from GNU time, which runs the command as its own child: a child forked
    straight from this (possibly large) process would count our pages in its peak. ckptkit
    gets an empty hash cache (it hashes its inputs, as on a first run) unless ``hash_cache``
    names one that already holds their hashes.
    """
    os.sync()  # earlier outputs' write-back must not land in this command's time
    env = dict(os.environ, CKPTKIT_CACHE_DIR=hash_cache or tempfile.mkdtemp(prefix="ckptkit-"))
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr}")
    return {"seconds": wall, "peak_rss": int(proc.stderr.strip().splitlines()[-1]) * 1024}


def warm(path: str) -> None:
    """Reads a file once so that every contender starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass

