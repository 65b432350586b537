"""Runs commands as child processes and reports wall time and the child's own peak RSS."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def cache_dir(given: str | None = None) -> Iterator[str]:
    """``given``, or else an empty hash cache folder for one run, removed afterwards (one
    left behind per measured run filled /tmp with empty folders)."""
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="ckptkit-") as fresh:
        yield fresh


def run(cmd: list[str], hash_cache: str | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds (user, system) and peak RSS (bytes) of one command;
    raises if it fails.

    The RSS comes from GNU time, which runs the command as its own child: a child forked
    straight from this (possibly large) process would count our pages in its peak. ckptkit
    gets an empty hash cache (it hashes its inputs, as on a first run) unless ``hash_cache``
    names one that already holds their hashes.
    """
    os.sync()  # earlier outputs' write-back must not land in this command's time
    with cache_dir(hash_cache) as cache:
        env = dict(os.environ, CKPTKIT_CACHE_DIR=cache)
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr}")
    user, system, peak = proc.stderr.strip().splitlines()[-1].split()
    return {"seconds": wall, "user": float(user), "system": float(system),
            "peak_rss": int(peak) * 1024}


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


def paired_ratio(results: dict[str, list[dict[str, float]]], name: str, base: str) -> float:
    """``name``'s time as a multiple of ``base``'s: the median of the ratios within each
    round (runs close in time: on a VM the same copy can take 2x longer in a slow spell, and
    a ratio of overall medians would compare runs from different spells). Both need one run
    per round, in the same rounds."""
    return statistics.median(r["seconds"] / b["seconds"]
                             for r, b in zip(results[name], results[base], strict=True))


def print_against_cp(results: dict[str, list[dict[str, float]]],
                     baselines: dict[str, tuple[str, str]] | None = None) -> None:
    """Each command's median seconds; its time as a multiple of "cp" and of "cp + sync"
    (``paired_ratio``); the best run; the median CPU seconds spent in the program itself
    (user) and in the kernel (system); and peak RSS. A command named in ``baselines`` is
    compared with the two given there (a copy of its own inputs) instead."""
    def median(name: str, what: str = "seconds") -> float:
        return statistics.median(r[what] for r in results[name])

    print(f"{'command':<32}{'seconds':>9}{'x cp':>7}{'x cp+sync':>11}{'best':>7}"
          f"{'user':>7}{'system':>8}{'peak RSS MB':>13}")
    for name, runs in results.items():
        peak = max(r["peak_rss"] for r in runs) / 1e6
        best = min(r["seconds"] for r in runs)
        plain, synced = (paired_ratio(results, name, base) for base in
                         (baselines or {}).get(name, ("cp", "cp + sync")))
        print(f"{name:<32}{median(name):>9.2f}{plain:>7.2f}{synced:>11.2f}{best:>7.2f}"
              f"{median(name, 'user'):>7.2f}"
              f"{median(name, 'system'):>8.2f}{peak:>13.0f}")
