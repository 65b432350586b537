"""Benchmark: a rank-32 kohya LoRA covering the SDXL U-Net (linear layers and 3x3 convs) and
both text encoders, baked at strength 1 into a full-size SDXL fp16 checkpoint (6.9 GB,
random values from ``ckpt sample sdxl``): ``ckpt lora bake`` against the in-memory way
(``safetensors.torch.load_file`` of the model and the LoRA, each module applied in fp32 as
kohya's ``sdxl_merge_lora.py`` does, W + ratio * alpha/rank * up @ down, ``save_file``).

Each contender is a child process started from the same state (``measure.settle``); peak
private memory (RssAnon: not the file-backed pages of memory-mapped inputs) and RSS are
sampled every 20 ms (``merge_bench.sample_run``). The outputs are checked against each other
(within fp16 rounding) before figures are printed. The model and outputs take about 21 GB
of disk (deleted at the end unless --keep); the in-memory way needs about 8 GB of RAM.

    .venv/bin/python bench/lora_bake_bench.py [--workdir bench/out] [--repeat 1] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

import torch
from measure import paired_ratio, settle
from merge_bench import sample_run
from safetensors import safe_open
from safetensors.torch import save_file

from ckptkit.arch.families import family
from ckptkit.formats import open_checkpoint
from ckptkit.lora.modules import read_modules
from ckptkit.lora.names import module_names
from ckptkit.lora.targets import match

RANK, ALPHA = 32, 16.0
COMPONENTS = ("diffusion_model", "clip_l", "clip_g")

# The in-memory way: kohya's sdxl_merge_lora.py merge loop on load_file'd state dicts (the
# module -> model key table is what kohya gets from naming the loaded model's modules).
IN_MEMORY = """
import json, sys, torch
from safetensors.torch import load_file, save_file
model, lora = load_file(sys.argv[1]), load_file(sys.argv[2])
table = json.load(open(sys.argv[3]))
for name, targets in table.items():
    down = lora[name + ".lora_down.weight"].float()
    up = lora[name + ".lora_up.weight"].float()
    scale = lora[name + ".alpha"].item() / down.shape[0]
    if down.dim() == 2:
        delta = up @ down
    elif down.shape[2:] == (1, 1):
        delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    for key, rows, delta_rows in targets:  # open_clip's fused in_proj: q, k, v rows
        weight = model[key].float()
        rows = slice(*rows) if rows else slice(None)
        delta_rows = slice(*delta_rows) if delta_rows else slice(None)
        weight[rows] += delta[delta_rows].reshape(weight[rows].shape) * scale
        model[key] = weight.to(model[key].dtype)
save_file(model, sys.argv[4])
"""


def _adaptable(key: str, shape) -> bool:
    """kohya's targets: linear layers and 3x3 convolutions (LoCon), no embeddings."""
    return key.endswith(".weight") and len(shape) in (2, 4) and min(shape[:2]) > 1 \
        and not any(s in key for s in ("embedding", "embed_tokens", "text_projection",
                                       "time_embed", "label_emb"))


def make_lora(path: str, table_path: str, model: str) -> int:
    """The LoRA (kohya names, fp16, random factors) and, for the in-memory way, where each
    module lands in the model (what kohya knows from the model it builds: ``lora.targets``
    tells it here); returns the number of modules."""
    if os.path.exists(path) and os.path.exists(table_path):
        with open(table_path) as f:
            return len(json.load(f))
    fam = family("sdxl")
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for component in COMPONENTS:
        for key, shape in fam.component(component).keys().items():
            if not _adaptable(key, shape):
                continue
            try:
                (named,) = module_names("sdxl", component, key, "kohya")
            except (KeyError, ValueError):
                continue
            name = named.name
            tensors[name + ".lora_down.weight"] = (
                torch.randn((RANK, *shape[1:]), generator=gen) * 0.01).half()
            tensors[name + ".lora_up.weight"] = (
                torch.randn((shape[0], RANK, *([1] * (len(shape) - 2))), generator=gen)
                * 0.01).half()
            tensors[name + ".alpha"] = torch.tensor(ALPHA)
    save_file(tensors, path + ".part")
    os.replace(path + ".part", path)
    with open_checkpoint(path) as lora, open_checkpoint(model) as checkpoint:
        _, modules, _ = read_modules(lora)
        found = match(modules, checkpoint, "sdxl")
    if found.unmatched:
        raise RuntimeError(f"modules that land nowhere: {found.unmatched}")
    table = {name: [(t.key, t.rows, t.delta_rows) for t in targets]
             for name, targets in found.targets.items()}
    with open(table_path, "w") as f:
        json.dump(table, f)
    return len(table)


def same(a: str, b: str) -> float:
    """The largest difference between the two outputs, in units of the fp16 rounding step
    of the values compared; raises if the keys differ."""
    worst = 0.0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        names = list(fa.keys())
        if set(names) != set(fb.keys()):
            raise AssertionError("the outputs hold different keys")
        for key in names:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if not x.is_floating_point():
                assert torch.equal(x, y), key
                continue
            step = y.float().abs().clamp(min=2 ** -14) * 2 ** -10
            worst = max(worst, ((x.float() - y.float()).abs() / step).max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the model and LoRA")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < 25e9:
        print(f"needs about 25 GB free in {args.workdir}; {free / 1e9:.0f} GB are",
              file=sys.stderr)
        return 1
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    model = os.path.join(args.workdir, "sdxl_fp16.safetensors")
    if not os.path.exists(model):
        subprocess.run([ckpt, "sample", "sdxl", "-o", model, "--quiet"], check=True)
    lora = os.path.join(args.workdir, "sdxl_lora_r32.safetensors")
    table = os.path.join(args.workdir, "sdxl_lora_r32.json")
    modules = make_lora(lora, table, model)
    outs = {n: os.path.join(args.workdir, f"baked_{n}.safetensors")
            for n in ("in-memory", "ckptkit", "ckptkit-nofsync")}
    commands = {
        "in-memory": [sys.executable, "-c", IN_MEMORY, model, lora, table, outs["in-memory"]],
        "ckptkit": [ckpt, "lora", "bake", model, lora, "-o", outs["ckptkit"], "--quiet"],
        "ckptkit-nofsync": [ckpt, "lora", "bake", model, lora, "-o", outs["ckptkit-nofsync"],
                            "--quiet", "--no-fsync"],
    }
    results: dict[str, list[dict[str, float]]] = {n: [] for n in commands}
    try:
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                settle([model, lora], [outs[name]])
                results[name].append(sample_run(cmd))
        worst = max(same(outs[n], outs["in-memory"]) for n in ("ckptkit", "ckptkit-nofsync"))
        if worst > 1.0:
            print(f"FAIL: ckptkit's output differs from the in-memory one by {worst:.1f} "
                  "fp16 steps", file=sys.stderr)
            return 1
        print(f"model: {os.path.getsize(model) / 1e9:.2f} GB SDXL fp16; LoRA: {modules} "
              f"kohya modules, rank {RANK}, {os.path.getsize(lora) / 1e6:.0f} MB; median of "
              f"{args.repeat}; outputs equal within {worst:.1f} fp16 rounding step")
        print(f"{'method':<18}{'seconds':>9}{'x in-memory':>13}{'RssAnon MB':>12}{'RSS MB':>9}")
        for name, runs in results.items():
            s = statistics.median(r["seconds"] for r in runs)
            anon = max(r["anon"] for r in runs) / 1e6
            rss = max(r["rss"] for r in runs) / 1e6
            ratio = paired_ratio(results, name, "in-memory")
            print(f"{name:<18}{s:>9.2f}{ratio:>13.2f}{anon:>12.0f}{rss:>9.0f}")
    finally:
        for path in outs.values():
            if os.path.exists(path):
                os.unlink(path)
        if not args.keep:
            for path in (model, lora, table):
                if os.path.exists(path):
                    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
