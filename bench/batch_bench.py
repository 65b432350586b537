"""Benchmark: ``ckpt batch scan`` over 10,000 small files, one process against the local pool
against a local Ray cluster, in the same run.

The folder holds tiny samples of several families (safetensors, fp8, .ckpt, ComfyUI parts),
the scan corpus's hostile pickles and benign files, and broken files (tests/batch_files.py):
one of each, then hard links to them under other names up to 10,000 files (no disk space;
the page cache holds them all, so this measures the work, not the disk).

- one process: the same per-file code (``listing.files``, ``work.header``, ``Results``: the
  same rows, the same Parquet output) in a plain loop, no children;
- local pool: ``ckpt batch scan DIR -o OUT`` (one child per CPU);
- Ray: ``ckpt batch scan DIR -o OUT --ray ADDRESS`` on a cluster of two nodes on this
  machine (tests/ray_cluster.py: one CPU each), started before the clock starts, as an
  operator's cluster is; connecting to it is timed.

Each runs as a child process, rounds alternating the contenders. Printed per run: wall
seconds, files/s, CPU seconds (the kernel's exact count for the local contenders, split
into the run's own process, its forkserver and the workers; for Ray, sampled every 0.1 s),
for the pool the share of their lifetime the workers sat idle (no file to do: the parent
did not keep up) and waited for a CPU (a busy machine), the load average, and the CPU
this benchmark's sampler took meanwhile (on 2 cores, from the pool's and Ray's share; one
process leaves it a core). Then per contender: the median wall time, files/s, CPU s, files
per CPU second and peak memory (the peak of the summed PSS of its process tree, sampled
every 0.5 s, and for Ray of the cluster's processes beyond their idle size); the pool's
speed-up over one process and Ray's time over the pool's (the medians of each round's
ratio), the most the pool could gain on idle cores from CPU seconds alone, and the idle
Ray cluster's own CPU use. On a shared machine wall time measures the share of the CPUs a
contender got (Linux gives each session a share, so a busy neighbour holds the pool and one
process alike to it); CPU seconds measure the work itself. The outputs are checked to be
equal before the summary is printed.

    PYTHONPATH=src .venv/bin/python bench/batch_bench.py [--files 10000] [--repeat 3] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
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

PR_SET_CHILD_SUBREAPER = 36
SAMPLE = 0.1  # seconds between samples of Ray's CPU and the workers' scheduling
PSS_EVERY = 5  # samples between two of memory (smaps_rollup walks a process's page tables:
# milliseconds a process, which on 2 cores the pool's children lacked and one process did not)
TICK = os.sysconf("SC_CLK_TCK")

ONE_PROCESS = """
import sys
from ckptkit.batch import listing, work
from ckptkit.batch.results import Results
results = Results(sys.argv[2], False)
for item in listing.files([sys.argv[1]]):
    results.add(item if isinstance(item, dict) else work.header("scan", *item))
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
    return batch_files.process_tree(roots)


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid`` itself (not of the children it waited for: those are sampled
    on their own, and would be counted twice)."""
    fields = _stat(pid)
    return sum(int(v) for v in fields[11:13]) / TICK if fields else 0.0


def _schedstat(pid: int) -> tuple[float, float] | None:
    """Seconds ``pid`` has run and has waited on a run queue (ready, no CPU free)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ran, waited, _ = f.read().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def _title(pid: int) -> str:
    """What a Ray process is, for the breakdown of Ray's CPU: its title (``ray::...``, the
    raylet, the GCS...), or for a process below a Ray worker (our readers) its parent's."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().split(b"\0")
    except OSError:
        return "?"
    word = line[0].decode(errors="replace")
    if word.startswith("ray::"):
        return word.split(" ")[0][:48]
    if "python" in os.path.basename(word) and len(line) > 1:
        word = next((a.decode(errors="replace") for a in line[1:]
                     if a and not a.startswith(b"-")), word)
        if "multiprocessing" in " ".join(a.decode(errors="replace") for a in line):
            return "a Ray worker's readers (forkserver, children)"
    return os.path.basename(word)[:48]


def _role(pid: int, root: int) -> str:
    """The run itself, its forkserver (a child of the run) or a worker (anything below)."""
    if pid == root:
        return "parent"
    fields = _stat(pid)
    return "forkserver" if fields and fields[1] == str(root) else "workers"


def _reap(pid: int) -> tuple[int, float]:
    """Waits for ``pid``; its exit status and CPU seconds (its own and its reaped children's,
    exact: the kernel's count, not a sample)."""
    _, status, usage = os.wait4(pid, 0)
    return status, usage.ru_utime + usage.ru_stime


def _ours() -> set[int]:
    me = os.getpid()
    return {p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (_stat(p) or [0, me + 1])[1] == str(me)}


def measure(cmd: list[str], cluster: str | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak PSS (bytes) of ``cmd``'s process tree, and of the
    Ray cluster's processes (beyond what they held idle) when ``cluster`` names its folder.

    CPU seconds are the kernel's counts: this process is made the subreaper of ``cmd``'s
    tree, so a forkserver still running when the run ends comes back to it, and waiting for
    it yields its CPU and its children's (the pool's workers, which it waited for); a
    forkserver the run stops and reaps itself is in the run's count of its reaped children.
    Split into ``parent`` (the run itself, from its stat once it has exited), ``forkserver``
    (sampled) and ``workers`` (the rest). For the
    workers, ``idle`` is the share of their sampled lifetime they neither ran nor waited
    for a CPU (waiting for files: the parent did not keep up), ``queued`` the share they
    waited for a CPU. Ray's processes are sampled every 0.2 s (their last moments missed)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    base_cpu = {p: _cpu(p) for p in _cluster(cluster)} if cluster else {}
    base_pss = sum(_pss(p) for p in base_cpu)
    before = _ours()
    if cluster is None:  # (a Ray driver may leave processes that outlive it)
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = {"own": 0, "cluster": 0}
        cpu: dict[int, float] = {}
        roles: dict[int, str] = {}
        titles: dict[int, str] = {}
        life: dict[int, list[tuple[float, float, float]]] = {}
        stop = threading.Event()

        sampler_cpu = [0.0]

        def sample() -> None:
            for n in itertools.count():
                if stop.is_set():
                    break
                own = batch_files.process_tree({proc.pid})
                memory = n % PSS_EVERY == 0
                if memory:
                    peak["own"] = max(peak["own"], sum(_pss(p) for p in own))
                theirs = _cluster(cluster) - own if cluster else set()
                if theirs and memory:
                    peak["cluster"] = max(peak["cluster"],
                                          sum(_pss(p) for p in theirs) - base_pss)
                for p in own | theirs:
                    cpu[p] = max(cpu.get(p, 0.0), _cpu(p) - base_cpu.get(p, 0.0))
                    if p not in roles:
                        roles[p] = _role(p, proc.pid) if p in own else "ray"
                    if roles[p] == "ray" and (titles.get(p, "?") in ("?", "ray::IDLE")
                                              or not titles[p].startswith("ray::")):
                        titles[p] = _title(p)  # a worker's title: its last job's
                    if roles[p] == "workers" and (got := _schedstat(p)):
                        seen = life.setdefault(p, [])
                        seen[1:] = [(time.perf_counter(), *got)]
                        if len(seen) == 1:
                            seen.append(seen[0])
                sampler_cpu[0] = time.thread_time()
                stop.wait(SAMPLE)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet:
        wall = time.perf_counter() - start
        own_cpu = _cpu(proc.pid)  # its stat's count of itself is final
        status, parent_cpu = _reap(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
        tree_cpu = 0.0
        if cluster is None:
            # What the run reaped itself (a forkserver that is a fork of it, and so the
            # workers that server reaped) is the tree's, not the run's own.
            tree_cpu, parent_cpu = parent_cpu - own_cpu, own_cpu
            for orphan in _ours() - before:  # a forkserver reparented to us
                tree_cpu += _reap(orphan)[1]
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0)
        else:
            tree_cpu = sum(c for p, c in cpu.items() if p != proc.pid and roles[p] != "ray")
        err.seek(0)
        if proc.returncode not in (0, 3, 4):
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: "
                               f"{err.read().decode()}")
    server = sum(c for p, c in cpu.items() if roles.get(p) == "forkserver")
    ray = sum(c for p, c in cpu.items() if roles.get(p) == "ray")
    by_title: dict[str, float] = {}
    for p, title in titles.items():
        by_title[title] = by_title.get(title, 0.0) + cpu.get(p, 0.0)
        if os.environ.get("BENCH_RAY_PIDS"):
            print(f"  {p} {title} {cpu.get(p, 0.0):.1f}")
    spans = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in life.values()]
    lived = sum(t for t, _, _ in spans) or 1.0
    return {"seconds": wall, "cpu": parent_cpu + tree_cpu + ray, "parent_cpu": parent_cpu,
            "server_cpu": server, "workers_cpu": max(0.0, tree_cpu - server), "ray_cpu": ray,
            "idle": sum(t - r - q for t, r, q in spans) / lived,
            "queued": sum(q for _, _, q in spans) / lived,
            "peak": peak["own"], "cluster_peak": peak["cluster"], "ray_titles": by_title,
            "sampler_cpu": sampler_cpu[0]}


def _idle_cpu(folder: str, seconds: float = 5.0) -> float:
    """CPU seconds a second that the Ray cluster's processes use doing nothing (its
    agents, metrics, heartbeats): on a small machine, a share of the CPUs the work lacks."""
    procs = _cluster(folder)
    before = {p: _cpu(p) for p in procs}
    time.sleep(seconds)
    return sum(_cpu(p) - c for p, c in before.items()) / seconds


def _line(name: str, r: dict[str, float], files: int) -> str:
    split = ""
    if name != "one process":
        split = (f" = parent {r['parent_cpu']:.1f} + forkserver {r['server_cpu']:.1f} + "
                 f"workers {r['workers_cpu']:.1f}" + (f" + Ray's {r['ray_cpu']:.1f}"
                                                       if name == "ray" else ""))
    idle = (f"; workers idle {r['idle']:.0%}, waiting for a CPU {r['queued']:.0%}"
            if name == "local pool" else "")
    if name == "ray":
        idle += "; Ray's CPU by process: " + ", ".join(
            f"{t} {c:.1f}" for t, c in sorted(r["ray_titles"].items(), key=lambda i: -i[1])
            if c >= 0.1)
    return (f"{name:12} {r['seconds']:6.2f} s {files / r['seconds']:5.0f} files/s  "
            f"CPU {r['cpu']:5.1f} s{split} ({1000 * r['cpu'] / files:.2f} ms a file){idle}  "
            f"load {r['load']:.1f}; this sampler {r['sampler_cpu']:.2f} CPU-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-ray", action="store_true", help="one process and the pool only")
    parser.add_argument("--only", default=None,
                        help="comma-separated contenders to run: one,pool,ray (A/B runs of one)")
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
    names = ["one process", "local pool"] + ([] if args.no_ray else ["ray"])
    if args.only:
        short = {"one": "one process", "pool": "local pool", "ray": "ray"}
        names = [short[n] for n in args.only.split(",")]
        args.no_ray = "ray" not in names
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    outs = {name: os.path.join(work, f"{name.replace(' ', '-')}.parquet")
            for name in ("one process", "local pool", "ray")}
    with (contextlib.nullcontext() if args.no_ray
          else ray_cluster.cluster(os.path.join(work, "ray"))) as address:
        idle = _idle_cpu(os.path.join(work, "ray")) if address else None
        for _ in range(args.repeat):
            for name, cmd in (
                    ("one process", [sys.executable, "-c", ONE_PROCESS, folder,
                                     outs["one process"]]),
                    ("local pool", [*ckpt, "batch", "scan", folder, "-o",
                                    outs["local pool"], "--quiet"]),
                    ("ray", [*ckpt, "batch", "scan", folder, "-o", outs["ray"], "--quiet",
                             "--ray", str(address)])):
                if name not in runs:
                    continue
                if os.path.exists(outs[name]):
                    os.unlink(outs[name])
                load = os.getloadavg()[0]
                r = measure(cmd, os.path.join(work, "ray") if name == "ray" else None)
                runs[name].append({**r, "load": load})
                print(_line(name, runs[name][-1], args.files), flush=True)
    tables = {name: pq.read_table(outs[name]) for name in runs}
    names = list(tables)
    for name in names[1:]:  # every contender's rows are the same
        assert tables[names[0]].equals(tables[name]), f"{name}'s rows differ from {names[0]}'s"
    print(f"load average after: {os.getloadavg()}")
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        peak = max(r["peak"] for r in rs) / 2**20
        cluster = max(r["cluster_peak"] for r in rs) / 2**20
        extra = f" + Ray's processes {cluster:.0f} MiB" if name == "ray" else ""
        each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{name:12} median {median[name]:6.2f} s (runs: {each})  "
              f"{args.files / median[name]:5.0f} files/s  CPU {cpu[name]:5.1f} s "
              f"({args.files / cpu[name]:.0f} files per CPU second)  peak PSS "
              f"{peak:.0f} MiB{extra}")
    # Ratios within each round (runs close in time), then their median: on a shared machine
    # a slow spell can double every time, and a ratio of medians would mix spells.
    if "one process" in runs and "local pool" in runs:
        speedup = paired_ratio(runs, "one process", "local pool")
        ceiling = cpu["one process"] / (cpu["local pool"] / cores)
        print(f"local pool: {speedup:.2f}x one process's speed (target >= 1.7x); on {cores} "
              f"idle cores at most {ceiling:.2f}x (one process's CPU over the pool's CPU "
              f"shared by {cores} cores; its start and final sort run on one)")
    if "ray" in runs and "local pool" in runs:
        overhead = paired_ratio(runs, "ray", "local pool")
        print(f"Ray: {overhead:.2f}x the pool's time (target <= 1.3x); medians of the "
              f"rounds' ratios; the idle cluster alone used {idle:.2f} CPU-s a second")
    print("files per CPU second (for sizing: files/s per busy core): " + ", ".join(
        f"{name} {args.files / cpu[name]:.0f}" for name in runs))


if __name__ == "__main__":
    main()
