"""Benchmark: the floor under ``ckpt batch scan --ray``: what Ray and Ray Data cost before any
file is read, on the benchmark's local cluster (tests/ray_cluster.py: two nodes of one CPU).

- connect: a driver that imports Ray, connects to the cluster and shuts down;
- connect + data: the same, importing ``ray.data`` too;
- empty job: the smallest Ray Data job of the batch run's shape: one read task yielding
  ``--rows`` tiny rows in blocks of 100, ``map_batches`` on a pool of two actors that do
  nothing (two CPUs: the cluster's), the rows back to the driver with ``iter_batches``;
- core actors: the same work with Ray Core alone (no Ray Data): two actors of one CPU that
  do nothing, the blocks sent from the driver, two in flight per actor.

Wall seconds and CPU seconds (the driver's and the cluster's processes', sampled as
bench/batch_bench.py does), rounds alternating the contenders; the medians. Compare with the
local pool's time from bench/batch_bench.py: Ray's target is 1.3x it. The first round on the
fresh cluster also starts Ray Data's detached actors (its stats actor, autoscaling
coordinator and actor location tracker: about 4 CPU-s), which stay in the cluster for every
later job, as on an operator's cluster.

    PYTHONPATH=src .venv/bin/python bench/ray_floor.py [--rows 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import batch_bench
import ray_cluster

CONNECT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
ray.shutdown()
"""
DATA = """
import sys, ray, ray.data
ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
ray.shutdown()
"""
JOB = """
import os, sys
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
import ray, ray.data
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
rows = int(sys.argv[2])
context = ray.data.DataContext.get_current()
context.enable_progress_bars = False
context.print_on_execution_start = False


class Source(Datasource):
    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        def read():
            for start in range(0, rows, 100):
                yield pa.table({"file": [b"x" * 40] * min(100, rows - start)})

        return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None,
                                             exec_stats=None, input_files=None))]


class Nothing:
    def __call__(self, batch):
        return batch


dataset = ray.data.read_datasource(Source(), num_cpus=0, override_num_blocks=1).map_batches(
    Nothing, batch_size=100, batch_format="pyarrow", num_cpus=1,
    compute=ray.data.ActorPoolStrategy(size=2))
got = sum(t.num_rows for t in dataset.iter_batches(batch_format="pyarrow", batch_size=None))
assert got == rows, got
ray.shutdown()
"""

CORE = """
import sys, ray
import pyarrow as pa

ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
rows = int(sys.argv[2])


@ray.remote(num_cpus=1)
class Nothing:
    def __call__(self, batch):
        return batch


actors = [Nothing.remote() for _ in range(2)]
blocks = (pa.table({"file": [b"x" * 40] * min(100, rows - start)})
          for start in range(0, rows, 100))
pending, got = [], 0
for i, block in enumerate(blocks):
    pending.append(actors[i % 2].__call__.remote(block))
    if len(pending) >= 4:
        done, pending = ray.wait(pending)
        got += sum(t.num_rows for t in ray.get(done))
got += sum(t.num_rows for t in ray.get(pending))
assert got == rows, got
ray.shutdown()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.TemporaryDirectory(prefix="ray-floor-")
    folder = os.path.join(work.name, "ray")
    os.makedirs(folder)
    runs: dict[str, list[dict]] = {"connect": [], "connect + data": [], "empty job": [],
                                   "core actors": []}
    with ray_cluster.cluster(folder) as address:
        idle = batch_bench._idle_cpu(folder)
        print(f"idle cluster: {idle:.2f} CPU-s a second")
        for _ in range(args.repeat):
            for name, code in (("connect", CONNECT), ("connect + data", DATA),
                               ("empty job", JOB), ("core actors", CORE)):
                r = batch_bench.measure([sys.executable, "-c", code, address,
                                         str(args.rows)], folder)
                runs[name].append(r)
                titles = ", ".join(f"{t} {c:.1f}" for t, c in sorted(
                    r["ray_titles"].items(), key=lambda i: -i[1]) if c >= 0.1)
                print(f"{name:15} {r['seconds']:6.2f} s  CPU {r['cpu']:5.1f} s = driver "
                      f"{r['parent_cpu']:.1f} + Ray's {r['ray_cpu']:.1f} ({titles})  load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    work.cleanup()
    for name, rs in runs.items():
        print(f"{name:15} median {statistics.median(r['seconds'] for r in rs):6.2f} s  CPU "
              f"{statistics.median(r['cpu'] for r in rs):5.1f} s (driver "
              f"{statistics.median(r['parent_cpu'] for r in rs):.1f})")


if __name__ == "__main__":
    main()
