"""Runs commands as child processes and reports wall time and the child's own peak RSS."""

from __future__ import annotations

import os
import shutil
import statistics
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


def settle(inputs: list[str], leftovers: list[str]) -> bool:
    """The same start for every contender: earlier outputs removed (so none writes beside
    several GB of dead pages, or pays for freeing them), written data synced, the page cache
    emptied where we may (root) and the inputs read back into it. Returns whether the cache
    could be emptied."""
    for path in leftovers:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        dropped = True
    except OSError:
        dropped = False
    for path in inputs:
        warm(path)
    return dropped


def warm(path: str) -> None:
    """Reads a file once so that every contender starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def print_against_cp(results: dict[str, list[dict[str, float]]]) -> None:
    """Median seconds of each command, as a multiple of "cp" and of "cp + sync", and peak
    RSS."""
    def median(name: str) -> float:
        return statistics.median(r["seconds"] for r in results[name])

    base, durable = median("cp"), median("cp + sync")
    print(f"{'command':<32}{'seconds':>9}{'x cp':>7}{'x cp+sync':>11}{'peak RSS MB':>13}")
    for name, runs in results.items():
        seconds, peak = median(name), max(r["peak_rss"] for r in runs) / 1e6
        print(f"{name:<32}{seconds:>9.2f}{seconds / base:>7.2f}{seconds / durable:>11.2f}"
              f"{peak:>13.0f}")
