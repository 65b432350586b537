"""Benchmark: split, assemble and prune of a full-size SDXL checkpoint (6.9 GB fp16), each
against ``cp`` of the same bytes in the same run, and against ``cp`` followed by ``sync`` of
the copy (ckptkit syncs its outputs to disk before they take their names; ``cp`` does not).

The input is ``ckpt sample sdxl`` with random fp16 weights (real data on disk, not holes).
Each command runs as a child process under GNU time (wall seconds, peak RSS); before each,
its inputs are read once (warm page cache) and earlier writes are synced.

    .venv/bin/python bench/parts_bench.py [--workdir bench/out] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from measure import print_against_cp, run, warm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = os.path.join(args.workdir, "parts")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    src = os.path.join(work, "sdxl_fp16.safetensors")
    if not os.path.exists(src):
        run([ckpt, "sample", "sdxl", "-o", src, "--quiet"])
    parts = os.path.join(work, "split")
    te = os.path.join(parts, "text_encoders", "sdxl_fp16_clip_{}.safetensors")
    commands = {
        "cp": ["cp", src, os.path.join(work, "copy.safetensors")],
        "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', src,
                      os.path.join(work, "copy.safetensors")],
        "split": [ckpt, "split", src, "-o", parts, "--quiet"],
        "assemble": [ckpt, "assemble", "--diffusion-model",
                     os.path.join(parts, "diffusion_models", "sdxl_fp16.safetensors"),
                     "--text-encoder", te.format("l"), "--text-encoder", te.format("g"),
                     "--vae", os.path.join(parts, "vae", "sdxl_fp16.safetensors"),
                     "-o", os.path.join(work, "assembled.safetensors"), "--quiet"],
        "prune --dtype bf16": [ckpt, "prune", src, "-o", os.path.join(work, "pruned.safetensors"),
                               "--dtype", "bf16", "--vae-dtype", "bf16", "--quiet"],
    }
    for name in ("split", "assemble", "prune --dtype bf16"):  # as cp: no wait for the disk
        commands[f"{name} --no-fsync"] = [*commands[name], "--no-fsync"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            # every command starts with its inputs in the page cache (assemble's are the
            # split's outputs)
            for path in [src] + ([c for c in cmd if c.startswith(parts)]
                                 if name.startswith("assemble") else []):
                warm(path)
            results[name].append(run(cmd))
    size = os.path.getsize(src)
    print(f"input: {size / 1e9:.2f} GB SDXL fp16, median of {args.repeat} runs")
    print_against_cp(results)
    shutil.rmtree(parts, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
