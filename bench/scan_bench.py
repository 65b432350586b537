"""Benchmark: ``ckpt scan`` against picklescan on a folder of mixed checkpoints (several GB).

The folder holds a full-size SD 1.5 fp16 checkpoint in the zip and the legacy torch formats,
its safetensors conversion, and the test corpus (one hostile file per published bypass plus
benign torch/safetensors files). Each scanner runs as a child process on the warm folder and
reports its own wall time and the bytes it read (``rchar`` of /proc/self/io); the report
also counts, file by file, which hostile files each scanner flags.

    .venv/bin/pip install picklescan   # bench-only dependency
    .venv/bin/python bench/scan_bench.py [--workdir bench/out] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import corpus  # noqa: E402
from convert_bench import make_input  # noqa: E402
from measure import warm  # noqa: E402

RUN_OURS = """
import json, sys, time
from ckptkit.ops.scan import scan_file, walk
start = time.perf_counter()
done = [scan_file(e) if isinstance(e, str) else e for e in walk([sys.argv[1]])]
results = {r.path: r.verdict for r in done}
elapsed = time.perf_counter() - start
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"seconds": elapsed, "rchar": int(io["rchar"]),
                  "flagged": [p for p, v in results.items() if v != "safe" and v != "skipped"],
                  "files": len(results)}))
"""

# picklescan's own folder walk (scan_directory_path) stops at the first file it cannot
# parse (one of the corpus's ZIP tricks raises BadZipFile out of it), so it is driven file by
# file here, as a script would have to; a crash on a file counts as flagging it.
RUN_PICKLESCAN = """
import json, os, sys, time
from picklescan.scanner import scan_directory_path, scan_file_path
try:
    scan_directory_path(sys.argv[1])
    folder_walk = "completed"
except Exception as exc:
    folder_walk = type(exc).__name__
start = time.perf_counter()
io0 = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
flagged, files = [], 0
for root, _, names in os.walk(sys.argv[1]):
    for name in names:
        path = os.path.join(root, name)
        files += 1
        try:
            r = scan_file_path(path)
            if r.infected_files or r.scan_err:
                flagged.append(path)
        except Exception:
            flagged.append(path)
elapsed = time.perf_counter() - start
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"seconds": elapsed, "rchar": int(io["rchar"]) - int(io0["rchar"]),
                  "flagged": flagged, "files": files, "folder_walk": folder_walk}))
"""


def build_folder(workdir: str) -> tuple[str, set[str]]:
    folder = os.path.join(workdir, "scan_folder")
    big = os.path.join(workdir, "sd15_fp16.ckpt")
    make_input(big)
    legacy = os.path.join(workdir, "sd15_fp16_legacy.ckpt")
    if not os.path.exists(legacy):
        state = torch.load(big, weights_only=True, mmap=True)
        torch.save(state, legacy + ".part", _use_new_zipfile_serialization=False)
        os.replace(legacy + ".part", legacy)
    st = os.path.join(workdir, "out_ckptkit.safetensors")
    if not os.path.exists(st):
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ckpt"), "convert", big,
                        "-o", st, "--quiet"], check=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "hostile"))
    os.makedirs(os.path.join(folder, "benign"))
    for src in (big, legacy, st):
        os.link(src, os.path.join(folder, os.path.basename(src)))
    with tempfile.TemporaryDirectory() as markers:
        hostile = corpus.build_hostile(os.path.join(folder, "hostile"), markers)
    corpus.build_benign(os.path.join(folder, "benign"))
    return folder, {os.path.join(folder, "hostile", n) for n in hostile}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    folder, hostile = build_folder(args.workdir)
    total = folder_bytes(folder)
    runners = {"ckpt scan": RUN_OURS, "picklescan": RUN_PICKLESCAN}
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, script in runners.items():
            for root, _, names in os.walk(folder):
                for n in names:
                    warm(os.path.join(root, n))
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", script, folder], capture_output=True,
                                 text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["wall"] = time.perf_counter() - start
            runs[name].append(result)
    files = sum(len(ns) for _, _, ns in os.walk(folder))
    print(f"folder: {files} files, {total / 1e9:.2f} GB ({len(hostile)} hostile); "
          f"median of {args.repeat} runs")
    print(f"{'scanner':<12}{'scan s':>8}{'files/s':>9}{'bytes read':>14}{'hostile flagged':>17}")
    summary = {}
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rchar = statistics.median(r["rchar"] for r in results)
        caught = len(hostile & set(results[-1]["flagged"]))
        summary[name] = {"seconds": seconds, "files_per_s": files / seconds, "rchar": rchar,
                         "hostile_flagged": caught, "hostile": len(hostile)}
        print(f"{name:<12}{seconds:>8.2f}{files / seconds:>9.0f}{rchar / 1e6:>11.1f} MB"
              f"{caught:>11}/{len(hostile)}")
        if "folder_walk" in results[-1]:
            summary[name]["folder_walk"] = results[-1]["folder_walk"]
            print(f"  ({name}'s own folder scan: {results[-1]['folder_walk']})")
    with open(os.path.join(args.workdir, "scan_bench.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
