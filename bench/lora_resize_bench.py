"""Benchmark: resize an SDXL-shaped kohya LoRA from rank 128 to 32, ckptkit (the exact SVD of
up @ down from QR factors and a 128 x 128 SVD) against kohya's way (sd-scripts
``resize_lora.py`` with ``--svd_lowrank_niter 0``: the LoRA loaded, each module's up @ down
made in fp32 and given a full ``torch.linalg.svd``), in the same run, each a child process:
wall time and peak private memory (RssAnon).

The LoRA has kohya's names and SDXL's shapes for every linear layer of the first ``--blocks``
transformer blocks of SDXL's middle block (width 1280: attention q/k/v/out, cross-attention
k/v from 2048, the 10240-wide feed-forward) and its proj_in/proj_out; random fp16 factors,
alpha 64. A full SVD of each 1280 x 10240 product takes kohya's way seconds, so the whole
U-Net (700 such modules) would take most of an hour on two cores: the per-module ratio is
what the whole file would show.

Both outputs store up = U·S over orthonormal down rows, so the singular values each kept
are its up's column norms (times alpha / rank): those are compared (relative difference),
and ckptkit's down rows are checked to be orthonormal.

    .venv/bin/python bench/lora_resize_bench.py [--workdir bench/out] [--blocks 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from measure import settle
from merge_bench import sample_run
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from ckptkit.arch.families import families
from ckptkit.lora.names import module_name

OLD, NEW = 128, 32

KOHYA = r"""
import sys, torch
from safetensors.torch import load_file, save_file
src, out, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = load_file(src)
result = dict(sd)
with torch.no_grad():
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key[:-len(".lora_down.weight")]
        down, up = sd[key].float(), sd[name + ".lora_up.weight"].float()
        scale = float(sd[name + ".alpha"]) / down.shape[0]
        full = up @ down
        U, S, Vh = torch.linalg.svd(full)
        result[name + ".lora_up.weight"] = (U[:, :new] @ torch.diag(S[:new])).half().contiguous()
        result[name + ".lora_down.weight"] = Vh[:new].half().contiguous()
        result[name + ".alpha"] = torch.tensor(scale * new).half()
save_file(result, out)
"""


def make(path: str, blocks: int) -> int:
    """Writes the LoRA; returns its module count."""
    table = families()["sdxl"].component("diffusion_model").keys()
    prefixes = (*(f"middle_block.1.transformer_blocks.{i}." for i in range(blocks)),
                "middle_block.1.proj_in.", "middle_block.1.proj_out.")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in table.items():
        if not key.startswith(prefixes) or not key.endswith(".weight") or len(shape) != 2:
            continue
        name = module_name("sdxl", "diffusion_model", key, "kohya")
        state[name + ".lora_down.weight"] = (torch.randn(OLD, shape[1], generator=gen)
                                             / shape[1] ** 0.5).half()
        state[name + ".lora_up.weight"] = (torch.randn(shape[0], OLD, generator=gen)
                                           * 0.01).half()
        state[name + ".alpha"] = torch.tensor(64.0).half()
    save_file(state, path, {"ss_network_dim": str(OLD), "ss_network_alpha": "64.0",
                            "ss_base_model_version": "sdxl_base_v1-0"})
    return len(state) // 3


def kept_values(path: str) -> dict[str, torch.Tensor]:
    """Module -> the singular values its (up, orthonormal down) hold, times alpha / rank."""
    values = {}
    with safe_open(path, "pt") as f:
        for key in [k for k in f.keys() if k.endswith(".lora_down.weight")]:  # noqa: SIM118
            name = key[: -len(".lora_down.weight")]
            down = f.get_tensor(key).float()
            up = f.get_tensor(name + ".lora_up.weight").float()
            scale = float(f.get_tensor(name + ".alpha")) / down.shape[0]
            values[name] = (up.norm(dim=0) * scale).double()
            gram = down @ down.T
            if not torch.allclose(gram, torch.eye(down.shape[0]), atol=5e-3):
                raise AssertionError(f"{path}: the down rows of {name} are not orthonormal")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks (1-10)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"sdxl_lora_r{OLD}.safetensors")
    modules = make(src, args.blocks)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    outs = {n: os.path.join(args.workdir, f"resized_{n}.safetensors") for n in ("kohya", "ckptkit")}
    commands = {
        "kohya (full SVD)": [sys.executable, "-c", KOHYA, src, outs["kohya"], str(NEW)],
        "ckptkit": [ckpt, "lora", "resize", src, "-o", outs["ckptkit"], "--rank", str(NEW),
                    "--quiet"],
    }
    results: dict[str, list[dict[str, float]]] = {n: [] for n in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            settle([src], [p for p in outs.values() if p in cmd])
            results[name].append(sample_run(cmd))
    ours, theirs = kept_values(outs["ckptkit"]), kept_values(outs["kohya"])
    worst = max(float(((ours[n] - theirs[n]).abs() / theirs[n]).max()) for n in theirs)
    print(f"input: {os.path.getsize(src) / 1e6:.0f} MB, {modules} SDXL modules (middle block, "
          f"{args.blocks} transformer blocks), rank {OLD} -> {NEW}, median of {args.repeat}")
    print(f"{'method':<20}{'seconds':>9}{'x ckptkit':>11}{'s/module':>10}{'RssAnon MB':>12}")
    mine = statistics.median(r["seconds"] for r in results["ckptkit"])
    for name, runs in results.items():
        s = statistics.median(r["seconds"] for r in runs)
        anon = max(r["anon"] for r in runs) / 1e6
        print(f"{name:<20}{s:>9.2f}{s / mine:>11.1f}{s / modules:>10.3f}{anon:>12.0f}")
    print(f"singular values kept: largest relative difference {worst:.2e} (fp16 outputs)")
    for path in [src, *outs.values()]:
        if os.path.exists(path):
            os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
