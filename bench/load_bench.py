"""Benchmark: loading a full-size SDXL checkpoint (6.9 GB fp16, random weights) into a
diffusers pipeline with ``ckptkit.load_pipeline``, against diffusers' own
``StableDiffusionXLPipeline.from_single_file(path, config=LOCAL_DIR)`` with the configs (and
tokenizers) written to a local folder first and the Hub switched off (``HF_HUB_OFFLINE=1``),
in the same run; the same for a full-size SD 1.5 checkpoint (2.1 GB fp16) loaded as fp32;
then the time of one denoising step of a 512x512 SD 1.5 generation on this CPU.

Each load runs as a child process under GNU time (wall seconds, peak RSS), from the same
start (``measure.settle``: outputs removed, the page cache dropped where we may and the
input read back into it), taking turns. SDXL as stored, fp16 (ckptkit maps the file and
assigns its tensors where they are 64-byte aligned, as in every file ckptkit writes, so the
load reads nothing until they are used; diffusers reads and copies every tensor); SD 1.5
cast to fp32 by both (SDXL in fp32 takes 14 GB, more than this machine can spare for
diffusers' load, which holds the state dict beside the model). The tokenizers are the tests'
tiny ones: they take no measurable time in either loader. The SD 1.5 step is the second of a
2-step run (the first one pays for warm-up), with classifier-free guidance (a batch of 2),
fp32.

    .venv/bin/python bench/load_bench.py [--workdir bench/out] [--repeat 2] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from measure import run, settle

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")

# Each child writes the seconds of the load call alone to argv[4], once both have imported
# the same classes (diffusers imports its pipelines lazily: seconds, on first use).
_IMPORTS = """
import json, os, sys, time, torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
import diffusers
"""
_CKPTKIT = _IMPORTS + """
from ckptkit import load_pipeline
start = time.perf_counter()
pipe = load_pipeline(sys.argv[1], dtype=sys.argv[2], tokenizers=sys.argv[3])
open(sys.argv[4], "w").write(str(time.perf_counter() - start))
"""
_DIFFUSERS = _IMPORTS + """
dtype = {"fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
with open(os.path.join(sys.argv[3], "model_index.json")) as f:
    cls = getattr(diffusers, json.load(f)["_class_name"])
start = time.perf_counter()
pipe = cls.from_single_file(sys.argv[1], config=sys.argv[3], torch_dtype=dtype,
                            local_files_only=True)
open(sys.argv[4], "w").write(str(time.perf_counter() - start))
"""
_STEP = """
import json, sys, time, torch
from ckptkit import load_pipeline
pipe = load_pipeline(sys.argv[1], tokenizers=sys.argv[2])
pipe.set_progress_bar_config(disable=True)
marks = []
def mark(p, i, t, kw):
    marks.append(time.perf_counter())
    return kw
start = time.perf_counter()
pipe(prompt="a cat", num_inference_steps=2, height=512, width=512, output_type="latent",
     generator=torch.Generator().manual_seed(0), callback_on_step_end=mark)
print(json.dumps({"first": marks[0] - start, "second": marks[1] - marks[0],
                  "threads": torch.get_num_threads()}))
"""


def _config_folder(work: str, fid: str, tiny: bool, tokenizers: str) -> str:
    """The family's diffusers folder without weights: configs, scheduler, tokenizers."""
    from ckptkit.ops.sample import sample

    folder = os.path.join(work, f"{fid}-config")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    sample(fid, folder, layout="diffusers", sparse=True, tiny=tiny)
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                os.unlink(os.path.join(root, name))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    for sub in ("tokenizer", "tokenizer_2"):
        if sub in index:
            shutil.copytree(os.path.join(tokenizers, "clip"), os.path.join(folder, sub))
            index[sub] = ["transformers", "CLIPTokenizer"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke test")
    args = parser.parse_args()
    work = os.path.join(args.workdir, "load")
    os.makedirs(work, exist_ok=True)
    sys.path.insert(0, TESTS)
    from tiny_tokenizers import write_all

    from ckptkit.ops.sample import sample
    from ckptkit.threads import let_idle_threads_sleep

    tokenizers = str(write_all(Path(work) / "tokenizers"))
    size = "-tiny" if args.tiny else ""
    cases = [("sdxl", os.path.join(work, f"sdxl{size}_fp16.safetensors"), "fp16"),
             ("sd1", os.path.join(work, f"sd15{size}_fp16.safetensors"), "fp32")]
    os.environ["HF_HUB_OFFLINE"] = "1"
    # as ``ckpt`` runs (ckptkit.threads); on this busy 2-core machine spinning doubled the
    # time of every cast in both loaders
    let_idle_threads_sleep()
    python = sys.executable
    results: dict[str, list[dict[str, float]]] = {}
    for fid, src, dtype in cases:
        if not os.path.exists(src):
            sample(fid, src, dtype="fp16", tiny=args.tiny)
        config = _config_folder(work, fid, args.tiny, tokenizers)
        for i in range(args.repeat):
            order = [("ckptkit", _CKPTKIT, tokenizers), ("diffusers", _DIFFUSERS, config)]
            if i % 2:
                order.reverse()
            for name, code, extra in order:
                settle([src], [])
                timing = os.path.join(work, "load-seconds")
                row = run([python, "-c", code, src, dtype, extra, timing])
                with open(timing) as f:
                    row["load"] = float(f.read())
                results.setdefault(f"{fid} {dtype} {name}", []).append(row)
    print(f"load into a pipeline, median of {args.repeat} (x: against diffusers; process: "
          "the whole child, imports included; load: the call alone):")
    print(f"{'':22} {'process':>8} {'load':>6} {'peak RSS':>11} {'x load':>7} {'x RSS':>6}")
    for fid, _, dtype in cases:
        base = results[f"{fid} {dtype} diffusers"]
        for name in ("ckptkit", "diffusers"):
            rows = results[f"{fid} {dtype} {name}"]
            seconds = statistics.median(r["seconds"] for r in rows)
            load = statistics.median(r["load"] for r in rows)
            rss = statistics.median(r["peak_rss"] for r in rows)
            ratio_t = load / statistics.median(r["load"] for r in base)
            ratio_m = rss / statistics.median(r["peak_rss"] for r in base)
            print(f"{fid + ' ' + dtype + ' ' + name:22} {seconds:8.1f} {load:6.1f} "
                  f"{rss / 2**30:8.2f} GB {ratio_t:7.2f} {ratio_m:6.2f}")
    if not args.tiny:
        os.unlink(cases[0][1])  # 6.9 GB
    out = subprocess.run([python, "-c", _STEP, cases[1][1], tokenizers], capture_output=True,
                         text=True, check=True)
    step = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SD 1.5 512x512, fp32, CFG (batch 2), {step['threads']} threads: first step "
          f"{step['first']:.1f} s, then {step['second']:.1f} s a step")
    os.unlink(cases[1][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
