"""Benchmark: ``ckpt batch scan`` over 10,000 small files, one process against the local pool
against a local Ray cluster, in the same run.

The folder holds tiny samples of several families (safetensors, fp8, .ckpt, ComfyUI parts),
the scan corpus's hostile pickles and benign files, and broken files (tests/batch_files.py):
one of each, then hard links to them under other names up to 10,000 files (no disk space;
the page cache holds them all, so this measures the work, not the disk).

- one process: the same per-file work (``scan_file``, the same rows, the same Parquet
  output) in a plain loop, no children;
- local pool: ``ckpt batch scan DIR -o OUT`` (one child per CPU);
- Ray: ``ckpt batch scan DIR -o OUT --ray ADDRESS`` on a cluster of two nodes on this
  machine (tests/ray_cluster.py: one CPU each), started before the clock starts, as an
  operator's cluster is; connecting to it is timed.

Each runs as a child process; its peak memory is the peak of the summed PSS of its process
tree (and, for Ray, of the cluster's processes too), sampled every 0.2 s. The outputs are
checked to be equal before any figure is printed. The load average is printed before and
after: the machine may be shared.

    PYTHONPATH=src .venv/bin/python bench/batch_bench.py [--files 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import batch_files  # noqa: E402
import ray_cluster  # noqa: E402

ONE_PROCESS = """
import os, sys, time
from ckptkit.batch import rows
from ckptkit.batch.results import Results
from ckptkit.ops.scan import ScanResult, scan_file, walk
results = Results(sys.argv[2], False)
for item in walk([sys.argv[1]]):
    if isinstance(item, ScanResult):
        results.add(rows.from_scan(item, None, None))
        continue
    info = os.stat(item)
    results.add(rows.from_scan(scan_file(item), info.st_size, info.st_mtime_ns))
results.finish(None)
"""


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(roots: set[int]) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _sessions(sids: set[int]) -> set[int]:
    """Processes of the given sessions (a Ray node and everything it started)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[4]) in sids:
                        found.add(int(entry))
            except OSError:
                continue
    return found


def measure(cmd: list[str], cluster_sids: set[int] | None = None) -> dict[str, float]:
    """Wall seconds and peak PSS (bytes) of ``cmd``'s process tree (plus the cluster's)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"own": 0, "cluster": 0}
    stop = threading.Event()

    def sample() -> None:
        base = sum(_pss(p) for p in _sessions(cluster_sids)) if cluster_sids else 0
        while not stop.is_set():
            peak["own"] = max(peak["own"], sum(_pss(p) for p in _tree({proc.pid})))
            if cluster_sids:
                now = sum(_pss(p) for p in _sessions(cluster_sids))
                peak["cluster"] = max(peak["cluster"], now - base)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode not in (0, 3, 4):
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {err.decode()}")
    return {"seconds": wall, "peak": peak["own"], "cluster_peak": peak["cluster"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    work = args.workdir or tempfile.mkdtemp(prefix="batch-bench-")
    folder = os.path.join(work, "files")
    if not os.path.isdir(folder):
        batch_files.build(folder, args.files)
    ckpt = [sys.executable, "-m", "ckptkit.cli.main"]
    cores = os.cpu_count() or 1
    print(f"{args.files} files, {cores} CPUs; load average before: {os.getloadavg()}")
    os.makedirs(os.path.join(work, "ray"), exist_ok=True)
    with ray_cluster.cluster(os.path.join(work, "ray")) as address:
        sids = {os.getsid(p) for p in _ray_node_pids()} - {os.getsid(0)}
        runs: dict[str, list[dict[str, float]]] = {"one process": [], "local pool": [],
                                                   "ray": []}
        outs = {name: os.path.join(work, f"{name.replace(' ', '-')}.parquet") for name in runs}
        for _ in range(args.repeat):
            for name, cmd in (
                    ("one process", [sys.executable, "-c", ONE_PROCESS, folder,
                                     outs["one process"]]),
                    ("local pool", [*ckpt, "batch", "scan", folder, "-o",
                                    outs["local pool"], "--quiet"]),
                    ("ray", [*ckpt, "batch", "scan", folder, "-o", outs["ray"], "--quiet",
                             "--ray", address])):
                runs[name].append(measure(cmd, sids if name == "ray" else None))
    tables = {name: pq.read_table(path) for name, path in outs.items()}
    assert tables["local pool"].equals(tables["ray"]), "Ray's rows differ from the pool's"
    assert tables["one process"].equals(tables["local pool"]), "the pool's rows differ"
    print(f"load average after: {os.getloadavg()}")
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        peak = max(r["peak"] for r in rs) / 2**20
        cluster = max(r["cluster_peak"] for r in rs) / 2**20
        extra = f", Ray cluster's processes +{cluster:.0f} MiB" if name == "ray" else ""
        each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{name:12} {median[name]:6.2f} s (runs: {each})  "
              f"{args.files / median[name]:6.0f} files/s  peak PSS {peak:.0f} MiB{extra}")
    print(f"local pool: {median['one process'] / median['local pool']:.2f}x one process's "
          f"speed (target >= 1.7x); Ray: {median['ray'] / median['local pool']:.2f}x the "
          "pool's time (target <= 1.3x)")
    print(f"files per second per core: one process {args.files / median['one process']:.0f},"
          f" local pool {args.files / median['local pool'] / cores:.0f}, Ray "
          f"{args.files / median['ray'] / cores:.0f}")


def _ray_node_pids() -> list[int]:
    """Pids of the ``ray start --block`` processes this benchmark started (its children)."""
    return [p for p in _tree({os.getpid()}) if p != os.getpid()]


if __name__ == "__main__":
    main()
