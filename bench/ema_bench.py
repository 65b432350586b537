"""Benchmark: ``prune --dtype fp16 --ema drop`` of a full-size fp32 SDXL training checkpoint
with EMA weights (about 24 GB: the model in fp32 plus an fp32 EMA copy of the UNet, named as
LDM/SGM training saves it, ``model_ema.`` + the key without dots), against ``cp`` of the
same file in the same run, with and without a ``sync`` of the copy (ckptkit syncs its
output before it takes its name).

The input holds random values (real data on disk, not holes), written once by ckptkit's own
streaming writer; it is as large as the machine's memory, so neither command finds all of it
in the page cache. Each runs as a child process under GNU time (wall seconds, peak RSS),
after a sync. The output is checked: no ``model_ema.`` key, fp16 everywhere but
the SDXL VAE (kept fp32) and the integer keys.

    .venv/bin/python bench/ema_bench.py [--workdir bench/out] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
from measure import print_against_cp, run
from safetensors import safe_open

from ckptkit.arch.families import family
from ckptkit.engine.writer import Planned, write_safetensors
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.ops.sample import sample_table


def _values(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 0.02


def make(path: str) -> None:
    if os.path.exists(path):
        return
    table = sample_table(family("sdxl"))
    planned = []
    for i, (key, shape) in enumerate(table.items()):
        if key.endswith("position_ids"):
            planned.append(Planned(key, BY_NAME["I64"], shape,
                                   partial(lambda s: torch.arange(s[-1]).expand(s).clone(),
                                           shape)))
            continue
        planned.append(Planned(key, BY_NAME["F32"], shape, partial(_values, shape, i)))
        if key.startswith("model.diffusion_model."):
            ema = "model_ema." + key[len("model."):].replace(".", "")
            planned.append(Planned(ema, BY_NAME["F32"], shape,
                                   partial(_values, shape, i + 100_000)))
    planned.append(Planned("model_ema.num_updates", BY_NAME["I32"], (),
                           lambda: torch.tensor(1000, dtype=torch.int32)))
    write_safetensors(path, planned, {"ckptkit.bench": "fp32 SDXL with EMA"}, fsync=False)


def check(path: str) -> None:
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert not any(k.startswith("model_ema.") for k in keys)
        for key in keys:
            dtype = f.get_slice(key).get_dtype()
            want = ("I64" if key.endswith("position_ids") else
                    "F32" if key.startswith("first_stage_model.") else "F16")
            assert dtype == want, (key, dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the 24 GB input")
    args = parser.parse_args()
    work = os.path.join(args.workdir, "ema")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "sdxl_fp32_ema.safetensors")
    make(src)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    copy, pruned = (os.path.join(work, n) for n in ("copy.safetensors", "pruned.safetensors"))
    commands = {"cp": ["cp", src, copy],
                "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, copy],
                "prune --dtype fp16 --ema drop": [ckpt, "prune", src, "-o", pruned, "--dtype",
                                                  "fp16", "--ema", "drop", "--quiet"]}
    # With --hash it also computes the input's SHA-256 for the output's metadata.
    commands["prune ... --hash"] = [*commands["prune --dtype fp16 --ema drop"], "--hash"]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            for leftover in (copy, pruned):
                if os.path.exists(leftover):
                    os.remove(leftover)
            results[name].append(run(cmd))
    check(pruned)
    print(f"input: {os.path.getsize(src) / 1e9:.2f} GB SDXL fp32 with EMA; output "
          f"{os.path.getsize(pruned) / 1e9:.2f} GB; median of {args.repeat}")
    print_against_cp(results)
    for leftover in (copy, pruned, *(() if args.keep else (src,))):
        if os.path.exists(leftover):
            os.remove(leftover)
    return 0


if __name__ == "__main__":
    sys.exit(main())
