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
tree (and, for Ray, of the cluster's processes beyond their idle size), its CPU seconds the
sum over those processes, both sampled every 0.2 s. On a shared machine wall time measures
the share of the CPUs a contender got; files per CPU second measure the work itself. The outputs are
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
from measure import paired_ratio  # noqa: E402

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


def _cluster(folder: str) -> set[int]:
    """The Ray cluster's processes: those naming its temporary folder (raylet, GCS, agents),
    its workers (``ray::...`` titles) and everything below them (our readers' children)."""
    roots = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    line = f.read()
            except OSError:
                continue
            if line.startswith(b"ray::") or folder.encode() in line:
                roots.add(int(entry))
    return _tree(roots)


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid`` itself (not of the children it waited for: those are sampled
    on their own, and would be counted twice)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], cluster: str | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak PSS (bytes) of ``cmd``'s process tree, and of the
    Ray cluster's processes (beyond what they held idle) when ``cluster`` names its folder.
    CPU seconds are sampled: a process's last 0.2 s before it exits can be missed."""
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    base_cpu = {p: _cpu(p) for p in _cluster(cluster)} if cluster else {}
    base_pss = sum(_pss(p) for p in base_cpu)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"own": 0, "cluster": 0}
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            own = _tree({proc.pid})
            peak["own"] = max(peak["own"], sum(_pss(p) for p in own))
            theirs = _cluster(cluster) - own if cluster else set()
            if theirs:
                peak["cluster"] = max(peak["cluster"], sum(_pss(p) for p in theirs) - base_pss)
            for p in own | theirs:
                cpu[p] = max(cpu.get(p, 0.0), _cpu(p) - base_cpu.get(p, 0.0))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode not in (0, 3, 4):
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {err.decode()}")
    return {"seconds": wall, "cpu": sum(cpu.values()), "peak": peak["own"],
            "cluster_peak": peak["cluster"]}


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
                runs[name].append(measure(cmd, os.path.join(work, "ray") if name == "ray"
                                          else None))
    tables = {name: pq.read_table(path) for name, path in outs.items()}
    assert tables["local pool"].equals(tables["ray"]), "Ray's rows differ from the pool's"
    assert tables["one process"].equals(tables["local pool"]), "the pool's rows differ"
    print(f"load average after: {os.getloadavg()}")
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        cpu = statistics.median(r["cpu"] for r in rs)
        peak = max(r["peak"] for r in rs) / 2**20
        cluster = max(r["cluster_peak"] for r in rs) / 2**20
        extra = f", Ray cluster's processes +{cluster:.0f} MiB" if name == "ray" else ""
        each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{name:12} {median[name]:6.2f} s (runs: {each})  "
              f"{args.files / median[name]:6.0f} files/s  {cpu:5.1f} CPU s "
              f"({args.files / cpu:.0f} files per CPU second)  peak PSS {peak:.0f} MiB{extra}")
    # Ratios within each round (runs close in time), then their median: on a shared machine
    # a slow spell can double every time, and a ratio of medians would mix spells.
    speedup = paired_ratio(runs, "one process", "local pool")
    overhead = paired_ratio(runs, "ray", "local pool")
    print(f"local pool: {speedup:.2f}x one process's speed (target >= 1.7x); Ray: "
          f"{overhead:.2f}x the pool's time (target <= 1.3x); medians of the rounds' ratios")
    print(f"files per second per core: one process {args.files / median['one process']:.0f},"
          f" local pool {args.files / median['local pool'] / cores:.0f}, Ray "
          f"{args.files / median['ray'] / cores:.0f}")


if __name__ == "__main__":
    main()
