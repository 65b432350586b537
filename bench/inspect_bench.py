"""Benchmark: ``ckpt inspect`` on a full-size FLUX.1 dev file (23.8 GB) and on a folder of 50
full-size checkpoints of every family, from their headers.

The files are sparse samples (``ckpt sample --sparse``: the real header and file size, the
data left as holes), so the benchmark needs no downloads and almost no disk. Each run is a
child process (``ckpt inspect --json``), timed from start to exit, interpreter start-up
included.

    .venv/bin/python bench/inspect_bench.py [--workdir bench/out] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from ckptkit.arch.families import families
from ckptkit.ops.sample import sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = os.path.join(args.workdir, "inspect_folder")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    flux = os.path.join(folder, "flux1-dev.safetensors")
    sample("flux1-dev", flux, layout="comfyui", components=["diffusion_model"], sparse=True,
           dtype="bf16")
    fids = list(families())
    for i in range(49):
        fid = fids[i % len(fids)]
        sample(fid, os.path.join(folder, f"{i:02d}_{fid}.safetensors"), sparse=True)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    total = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    timings: dict[str, list[float]] = {"one FLUX.1 dev file": [], "folder of 50": []}
    for _ in range(args.repeat):
        for name, target in (("one FLUX.1 dev file", flux), ("folder of 50", folder)):
            start = time.perf_counter()
            out = subprocess.run([ckpt, "inspect", "--json", "--quiet", target],
                                 capture_output=True, text=True, check=True)
            timings[name].append(time.perf_counter() - start)
            reports = [json.loads(line) for line in out.stdout.splitlines()]
            assert all(r["identification"]["family"] for r in reports), "unidentified file"
    print(f"folder: 50 files, {total / 1e9:.0f} GB (sparse), median of {args.repeat} runs, "
          "process start included")
    for name, values in timings.items():
        count = 1 if name.startswith("one") else 50
        median = statistics.median(values)
        print(f"{name:<22}{median:>7.2f} s  ({median / count * 1000:.0f} ms per file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
