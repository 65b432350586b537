"""Benchmark: weighted sum 0.5 of two full-size SD 1.5 fp16 safetensors files (2.1 GB each),
ckptkit against the AUTOMATIC1111 way (``load_file`` both, compute, ``save_file``) and
sd-mecha 1.1.8's ``weighted_sum``, in the same run.

Each runs as a child process from the same start (``measure.settle``: its earlier output
removed, writes synced, page cache dropped when root, inputs read back); a sampler reads the child's
/proc status every 20 ms for its peak private memory (RssAnon: not the file-backed pages of
memory-mapped inputs) and peak RSS. Outputs are checked against each other (within fp16
rounding) before figures are printed.

    .venv/bin/pip install sd-mecha==1.1.8   # bench-only (also a test extra)
    .venv/bin/python bench/merge_bench.py [--workdir bench/out] [--repeat 2]

``--sdxl``: add difference of three full-size SDXL fp16 samples (6.9 GB each, random values
from ``ckpt sample sdxl --seed N``), ckptkit only (the AUTOMATIC1111 way would hold 21 GB of
inputs plus the fp32 work in RAM), for its time and peak private memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from measure import cache_dir, paired_ratio, settle
from safetensors import safe_open
from safetensors.torch import save_file
from sd15_shapes import sd15

A1111 = """
import sys, torch
from safetensors.torch import load_file, save_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
out = {k: (v if not v.is_floating_point() else torch.lerp(v.float(), b[k].float(), 0.5).half())
       for k, v in a.items()}
save_file(out, sys.argv[3])
"""

MECHA = """
import sys, sd_mecha
recipe = sd_mecha.weighted_sum(sd_mecha.model(sys.argv[1]), sd_mecha.model(sys.argv[2]),
                               alpha=0.5)
sd_mecha.merge(recipe, output=sys.argv[3], output_dtype=__import__("torch").float16,
               threads=2)
"""


def make(path: str, seed: int) -> None:
    if os.path.exists(path):
        return
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen).to(torch.float16) for k, s in sd15().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    save_file(state, path + ".part")
    os.replace(path + ".part", path)


def sample_run(cmd: list[str], cache: str | None = None) -> dict[str, float]:
    """Wall seconds, peak RssAnon and peak VmRSS (bytes) of one child process. ckptkit gets
    an empty hash cache each time (it hashes its inputs as on a first run) unless ``cache``
    names one that already holds their hashes."""
    os.sync()
    # stderr goes to a file: a pipe nobody reads until the end fills up with a progress bar
    # (sd-mecha's tqdm) and stalls the child for ever.
    with cache_dir(cache) as folder, tempfile.TemporaryFile() as errors:
        env = dict(os.environ, CKPTKIT_CACHE_DIR=folder)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        anon = rss = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                anon = max(anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
                rss = max(rss, int(fields.get("VmRSS", "0 kB").split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed: {errors.read().decode()[-2000:]}")
    return {"seconds": seconds, "anon": anon, "rss": rss}


def close(a: str, b: str) -> bool:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = list(fa.keys())
        if set(keys) != set(fb.keys()):
            return False
        return all(torch.allclose(fa.get_tensor(k).float(), fb.get_tensor(k).float(),
                                  atol=2e-3) for k in keys)


def sdxl(workdir: str, repeat: int) -> int:
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    inputs = [os.path.join(workdir, f"sdxl_{n}.safetensors") for n in range(3)]
    for seed, path in enumerate(inputs):
        if not os.path.exists(path):
            subprocess.run([ckpt, "sample", "sdxl", "-o", path, "--seed", str(seed),
                            "--quiet"], check=True)
    out = os.path.join(workdir, "sdxl_merged.safetensors")
    runs = [sample_run([ckpt, "merge", "add-difference", *inputs, "-o", out, "--alpha", "1",
                        "--quiet"]) for _ in range(repeat)]
    total = sum(os.path.getsize(p) for p in inputs)
    print(f"inputs: 3 x {total / 3e9:.2f} GB SDXL fp16, add difference, median of {repeat}")
    anon, rss = (max(r[k] for r in runs) / 1e6 for k in ("anon", "rss"))
    print(f"ckptkit: {statistics.median(r['seconds'] for r in runs):.2f} s, RssAnon "
          f"{anon:.0f} MB, RSS {rss:.0f} MB")
    os.remove(out)
    return 0


def measure_all(commands: dict[str, list[str]], inputs: list[str], outputs: list[str],
                repeat: int) -> dict[str, list[dict[str, float]]]:
    """``repeat`` rounds of every command from the same start (``settle``). "ckptkit, hashes
    known" is the same merge with the inputs' hashes remembered (a second merge of the same
    files): it gets a hash cache filled beforehand, removed at the end."""
    results: dict[str, list[dict[str, float]]] = {n: [] for n in commands}
    with cache_dir() as remembered:
        subprocess.run([commands["ckptkit"][0], "inspect", "--hash", *inputs],
                       env=dict(os.environ, CKPTKIT_CACHE_DIR=remembered),
                       stdout=subprocess.DEVNULL, check=True)
        for _ in range(repeat):
            for name, cmd in commands.items():
                settle(inputs, [path for path in outputs if path in cmd])
                known = name == "ckptkit, hashes known"
                results[name].append(sample_run(cmd, remembered if known else None))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sdxl", action="store_true",
                        help="three SDXL models, add difference (memory)")
    parser.add_argument("--sd-mecha", action="store_true", help="also run sd-mecha")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.sdxl:
        return sdxl(args.workdir, args.repeat)
    a, b = (os.path.join(args.workdir, f"sd15_{n}.safetensors") for n in ("a", "b"))
    make(a, 1)
    make(b, 2)
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    outs = {n: os.path.join(args.workdir, f"merged_{n}.safetensors")
            for n in ("a1111", "sd-mecha", "ckptkit")}
    commands = {
        "a1111": [sys.executable, "-c", A1111, a, b, outs["a1111"]],
        "sd-mecha": [sys.executable, "-c", MECHA, a, b, outs["sd-mecha"]],
        "ckptkit": [ckpt, "merge", "weighted-sum", a, b, "-o", outs["ckptkit"], "--alpha",
                    "0.5", "--quiet"],
    }
    commands["ckptkit, hashes known"] = commands["ckptkit"]
    if not args.sd_mecha:
        del commands["sd-mecha"]
    results = measure_all(commands, [a, b], list(outs.values()), args.repeat)
    for name in (n for n in commands if n in outs and n != "ckptkit"):
        if not close(outs["ckptkit"], outs[name]):
            print(f"FAIL: ckptkit's output differs from {name}'s", file=sys.stderr)
            return 1
    bases = [n for n in ("a1111", "sd-mecha") if n in results]
    print(f"inputs: 2 x {os.path.getsize(a) / 1e9:.2f} GB SD 1.5 fp16, median of {args.repeat}")
    print(f"{'method':<24}{'seconds':>9}" + "".join(f"{'x ' + n:>12}" for n in bases)
          + f"{'RssAnon MB':>12}{'RSS MB':>9}")
    for name, runs in results.items():
        s = statistics.median(r["seconds"] for r in runs)
        anon = max(r["anon"] for r in runs) / 1e6
        rss = max(r["rss"] for r in runs) / 1e6
        ratios = "".join(f"{paired_ratio(results, name, n):>12.2f}" for n in bases)
        print(f"{name:<24}{s:>9.2f}{ratios}{anon:>12.0f}{rss:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
