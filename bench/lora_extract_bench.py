"""Benchmark: extract a rank-64 LoRA from two full-size SD 1.5 fp16 files (2.1 GB each),
ckptkit against kohya's way (sd-scripts ``extract_lora_from_models.py``: both models loaded,
a full ``torch.linalg.svd`` in fp32 per module, factors clamped to their 99th percentile),
in the same run, each a child process: wall time and peak private memory (RssAnon).

BASE is ``ckpt sample sd1`` (random weights); TUNED is BASE plus, in every linear and 1 x 1
convolution weight of the U-Net, a change of rank 32 with singular values over a decade
(Frobenius norm 1% of the weight's) under dense noise (30% of that): the flat tail of a real
fine-tune's difference, the hardest case for a randomized SVD. The text encoder is
unchanged (both contenders leave it out). k x k convolutions are left out by both (kohya's
default; ckptkit ``--conv-rank 0``). Both write the same modules, so the times compare
decompositions, not module sets.

Accuracy: for every module, the error of ckptkit's LoRA, ‖ΔW - up @ down · alpha / r‖, is
compared with the best a rank-64 matrix can do (Eckart-Young: the singular values the full
SVD discards, which the kohya child records): the total and the worst module's ratio.

    .venv/bin/python bench/lora_extract_bench.py [--workdir bench/out] [--repeat 1]
    .venv/bin/python bench/lora_extract_bench.py --tune   # oversampling x power iterations
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from measure import settle
from merge_bench import sample_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

UNET = "model.diffusion_model."
RANK = 64

KOHYA = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
base, tuned, out, record = sys.argv[1:5]
rank = int(sys.argv[5])
a, b = load_file(base), load_file(tuned)
lora, optimal = {}, {}
with torch.no_grad():
    for key, w in a.items():
        if not key.startswith("model.diffusion_model.") or not key.endswith(".weight"):
            continue
        if w.dim() not in (2, 4) or (w.dim() == 4 and w.shape[2:] != (1, 1)):
            continue
        if torch.equal(w, b[key]):
            continue
        mat = (b[key].float() - w.float()).reshape(w.shape[0], -1)
        r = min(rank, *mat.shape)
        U, S, Vh = torch.linalg.svd(mat)
        optimal[key] = [float(S[r:].double().pow(2).sum()), float(S.double().pow(2).sum())]
        U = U[:, :r] @ torch.diag(S[:r])
        Vh = Vh[:r, :]
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi = torch.quantile(dist, 0.99)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        name = "diffusion_model." + key[len("model.diffusion_model."):-len(".weight")]
        lora[name + ".lora_up.weight"] = U.reshape(w.shape[0], r, *w.shape[2:]).half().contiguous()
        lora[name + ".lora_down.weight"] = Vh.reshape(r, *w.shape[1:]).half().contiguous()
        lora[name + ".alpha"] = torch.tensor(float(r)).half()
save_file(lora, out)
json.dump(optimal, open(record, "w"))
"""


def _is_target(key: str, shape: tuple[int, ...]) -> bool:
    return (key.startswith(UNET) and key.endswith(".weight")
            and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))))


def change(shape: tuple[int, ...], gen: torch.Generator, size: float) -> torch.Tensor:
    """Rank 32 over a decade, Frobenius norm ``size``, plus noise of 0.3 ``size``."""
    rows, cols = shape[0], math.prod(shape[1:])
    low = (torch.randn(rows, 32, generator=gen) * torch.logspace(0, -1, 32)) \
        @ torch.randn(32, cols, generator=gen)
    noise = torch.randn(rows, cols, generator=gen)
    return (low * (size / low.norm()) + noise * (0.3 * size / noise.norm())).reshape(shape)


def make(workdir: str) -> tuple[str, str]:
    base, tuned = (os.path.join(workdir, f"sd15_{n}.safetensors") for n in ("base", "tuned"))
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    if not os.path.exists(base):
        subprocess.run([ckpt, "sample", "sd1", "-o", base, "--seed", "1", "--quiet"],
                       check=True)
    if not os.path.exists(tuned):
        state = load_file(base)
        gen = torch.Generator().manual_seed(2)
        for key, w in state.items():
            if _is_target(key, tuple(w.shape)):
                w32 = w.float()
                state[key] = (w32 + change(tuple(w.shape), gen, 0.01 * float(w32.norm()))).half()
        save_file(state, tuned + ".part")
        os.replace(tuned + ".part", tuned)
    return base, tuned


def errors(base: str, tuned: str, lora: str, optimal: dict) -> tuple[float, float, int]:
    """(sqrt(Σ error² / Σ optimal²), the worst module's error / optimal, modules)."""
    total_err = total_opt = 0.0
    worst = 0.0
    with safe_open(base, "pt") as fa, safe_open(tuned, "pt") as fb, safe_open(lora, "pt") as fl:
        names = {k.rsplit(".", 2)[0] for k in list(fl.keys()) if k.endswith(".lora_down.weight")}
        for key, (opt_sq, _) in optimal.items():
            name = "diffusion_model." + key[len(UNET):-len(".weight")]
            if name not in names:
                raise AssertionError(f"{lora} has no module for {key}")
            delta = (fb.get_tensor(key).float() - fa.get_tensor(key).float())
            delta = delta.reshape(delta.shape[0], -1)
            down = fl.get_tensor(name + ".lora_down.weight").float()
            up = fl.get_tensor(name + ".lora_up.weight").float()
            r = down.shape[0]
            alpha = float(fl.get_tensor(name + ".alpha"))
            approx = up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (alpha / r)
            err_sq = float((delta - approx).double().pow(2).sum())
            total_err += err_sq
            total_opt += opt_sq
            worst = max(worst, math.sqrt(err_sq / opt_sq) if opt_sq else 1.0)
    return math.sqrt(total_err / total_opt), worst, len(optimal)


def tune() -> int:
    """The truncation error of the randomized SVD over the optimal one, by oversampling and
    power iterations, on the changes this benchmark makes (SD 1.5 layer shapes)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from ckptkit.lora.lowrank import top_svd

    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1280, 1280), (5120, 1280), (640, 2048)):
        delta = change((rows, cols), gen, 1.0)
        s = torch.linalg.svdvals(delta.double())
        best = float(s[RANK:].pow(2).sum().sqrt())
        line = f"{rows}x{cols}:"
        for extra, iters in ((8, 1), (16, 2), (32, 2), (32, 3), (32, 4), (64, 2)):
            t = time.perf_counter()
            up, down = top_svd(delta, RANK, oversample=extra, iterations=iters).factors(RANK)
            spent = time.perf_counter() - t
            ratio = float((delta - up @ down).norm()) / best - 1
            line += f"  p{extra}/q{iters} {ratio:+.4f} ({spent:.2f}s)"
        print(line)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="measure the sketch's settings")
    parser.add_argument("--keep", action="store_true", help="keep the 4 GB of inputs")
    args = parser.parse_args()
    if args.tune:
        return tune()
    os.makedirs(args.workdir, exist_ok=True)
    base, tuned = make(args.workdir)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    outs = {n: os.path.join(args.workdir, f"extract_{n}.safetensors") for n in ("kohya", "ckptkit")}
    record = os.path.join(args.workdir, "extract_optimal.json")
    commands = {
        "kohya (full SVD)": [sys.executable, "-c", KOHYA, base, tuned, outs["kohya"], record,
                             str(RANK)],
        "ckptkit": [ckpt, "lora", "extract", base, tuned, "-o", outs["ckptkit"], "--rank",
                    str(RANK), "--conv-rank", "0", "--format", "comfyui", "--quiet"],
    }
    results: dict[str, list[dict[str, float]]] = {n: [] for n in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            settle([base, tuned], [p for p in outs.values() if p in cmd])
            results[name].append(sample_run(cmd))
    with open(record) as f:
        optimal = json.load(f)
    ours, worst, modules = errors(base, tuned, outs["ckptkit"], optimal)
    theirs, their_worst, _ = errors(base, tuned, outs["kohya"], optimal)
    print(f"inputs: 2 x {os.path.getsize(base) / 1e9:.2f} GB SD 1.5 fp16, rank {RANK}, "
          f"{modules} modules, median of {args.repeat}")
    print(f"{'method':<20}{'seconds':>9}{'x kohya':>9}{'RssAnon MB':>12}{'RSS MB':>9}"
          f"{'error / optimal':>17}{'worst module':>14}")
    base_s = statistics.median(r["seconds"] for r in results["kohya (full SVD)"])
    for name, runs in results.items():
        s = statistics.median(r["seconds"] for r in runs)
        anon = max(r["anon"] for r in runs) / 1e6
        rss = max(r["rss"] for r in runs) / 1e6
        err, bad = (ours, worst) if name == "ckptkit" else (theirs, their_worst)
        print(f"{name:<20}{s:>9.2f}{s / base_s:>9.2f}{anon:>12.0f}{rss:>9.0f}{err:>17.4f}"
              f"{bad:>14.4f}")
    for path in [*outs.values(), record] + ([] if args.keep else [base, tuned]):
        if os.path.exists(path):
            os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
