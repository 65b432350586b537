"""Benchmark: split, assemble and prune of a full-size SDXL checkpoint (6.9 GB fp16), each
against ``cp`` of the same bytes in the same run, and against ``cp`` followed by ``sync`` of
the copy (ckptkit syncs its outputs to disk before they take their names; ``cp`` does not,
and ``--no-fsync`` makes ckptkit do the same).

The input is ``ckpt sample sdxl`` with random fp16 weights (real data on disk, not holes);
assemble's inputs are its parts, split once before the timed runs, and assemble is compared
with ``cp -r`` of those parts (the same bytes). Each command runs as a
child process under GNU time (wall seconds, peak RSS) from the same start
(``measure.settle``): every earlier output removed, writes synced, the page cache dropped
(when run as root) and the command's inputs read back into it. The commands take turns, so
the disk's slow and fast spells fall on all of them, and each round starts one command later.
On this machine (a VM) the kernel's time to fill the page cache varies up to 2x between
spells of a few minutes, so each command is compared with the ``cp`` of its own round, and
the table shows the best run and the CPU time beside the median.

    .venv/bin/python bench/parts_bench.py [--workdir bench/out] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from measure import print_against_cp, run, settle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = os.path.join(args.workdir, "parts")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    src = os.path.join(work, "sdxl_fp16.safetensors")
    if not os.path.exists(src):
        run([ckpt, "sample", "sdxl", "-o", src, "--quiet"])
    parts = os.path.join(work, "parts")
    if not os.path.isdir(parts):
        run([ckpt, "split", src, "-o", parts, "--quiet"])
    part_files = [os.path.join(parts, "diffusion_models", "sdxl_fp16.safetensors"),
                  os.path.join(parts, "text_encoders", "sdxl_fp16_clip_l.safetensors"),
                  os.path.join(parts, "text_encoders", "sdxl_fp16_clip_g.safetensors"),
                  os.path.join(parts, "vae", "sdxl_fp16.safetensors")]
    out = os.path.join(work, "out")
    copy = os.path.join(out, "copy.safetensors")
    commands = {
        "cp": ["cp", src, copy],
        "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, copy],
        # assemble copies the parts' bytes, not the monolithic file's: its own baseline
        "cp parts": ["cp", "-r", parts, os.path.join(out, "parts")],
        "cp parts + sync": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*/*', parts,
                            os.path.join(out, "parts")],
        "split": [ckpt, "split", src, "-o", os.path.join(out, "split"), "--quiet"],
        "assemble": [ckpt, "assemble", "--diffusion-model", part_files[0],
                     "--text-encoder", part_files[1], "--text-encoder", part_files[2],
                     "--vae", part_files[3], "-o", os.path.join(out, "assembled.safetensors"),
                     "--quiet"],
        "prune --dtype bf16": [ckpt, "prune", src, "-o", os.path.join(out, "pruned.safetensors"),
                               "--dtype", "bf16", "--vae-dtype", "bf16", "--quiet"],
    }
    for name in ("split", "assemble", "prune --dtype bf16"):  # as cp: no wait for the disk
        commands[f"{name} --no-fsync"] = [*commands[name], "--no-fsync"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    dropped = True
    names = list(commands)
    for turn in range(args.repeat):  # each round starts one command later: no fixed order
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            cmd = commands[name]
            on_parts = name.startswith(("assemble", "cp parts"))
            dropped &= settle(part_files if on_parts else [src], [out])
            os.makedirs(out)
            results[name].append(run(cmd))
    size = os.path.getsize(src)
    print(f"input: {size / 1e9:.2f} GB SDXL fp16, median of {args.repeat} runs"
          + ("" if dropped else " (page cache not dropped between runs: not root)"))
    print_against_cp(results, {name: ("cp parts", "cp parts + sync") for name in commands
                               if name.startswith(("assemble", "cp parts"))})
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
