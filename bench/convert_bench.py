"""Benchmark: convert a full-size SD 1.5 fp16 .ckpt to safetensors, ckptkit against the usual way.

The usual way is ``torch.load(weights_only=True)`` then ``safetensors.torch.save_file``.
Both run in the same invocation, as child processes on the same warm input, and the report
gives wall time, peak RSS and the ratios. Outputs are checked tensor by tensor (with the
safetensors library) to be identical before any figure is printed.

    .venv/bin/python bench/convert_bench.py [--workdir bench/out] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from measure import run, warm
from safetensors import safe_open
from sd15_shapes import sd15

BASELINE = """
import sys, torch, safetensors.torch as st
sd = torch.load(sys.argv[1], weights_only=True)["state_dict"]
st.save_file(sd, sys.argv[2])
"""


def make_input(path: str) -> None:
    if os.path.exists(path):
        return
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.float16)
             for k, shape in sd15().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    torch.save({"state_dict": state, "global_step": 840000}, path + ".part")
    os.replace(path + ".part", path)


def same_tensors(a: str, b: str) -> bool:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = list(fa.keys())  # safe_open handles are not iterable
        if set(keys) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "sd15_fp16.ckpt")
    make_input(src)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    outs = {name: os.path.join(args.workdir, f"out_{name}.safetensors")
            for name in ("usual", "ckptkit", "ckptkit_nofsync")}
    commands = {
        "usual": [sys.executable, "-c", BASELINE, src, outs["usual"]],
        "ckptkit": [ckpt, "convert", src, "-o", outs["ckptkit"], "--quiet"],
        "ckptkit_nofsync": [ckpt, "convert", src, "-o", outs["ckptkit_nofsync"], "--quiet",
                            "--no-fsync"],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            warm(src)
            results[name].append(run(cmd))
    for name in ("ckptkit", "ckptkit_nofsync"):
        if not same_tensors(outs["usual"], outs[name]):
            print(f"FAIL: {name} output differs from the usual way's", file=sys.stderr)
            return 1
    summary = {name: {"seconds": statistics.median(r["seconds"] for r in runs),
                      "peak_rss_mb": max(r["peak_rss"] for r in runs) / 1e6}
               for name, runs in results.items()}
    base = summary["usual"]
    print(f"input: {src} ({os.path.getsize(src) / 1e9:.2f} GB), median of {args.repeat} runs")
    print(f"{'method':<18}{'seconds':>9}{'peak RSS MB':>13}{'time ratio':>12}{'RSS ratio':>11}")
    for name, s in summary.items():
        speedup = base["seconds"] / s["seconds"]
        rss = s["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{name:<18}{s['seconds']:>9.2f}{s['peak_rss_mb']:>13.0f}{speedup:>11.2f}x"
              f"{rss:>10.1%}")
    with open(os.path.join(args.workdir, "convert_bench.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
