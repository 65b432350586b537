"""Benchmark: reading GGUF files, ckptkit against the gguf package.

1. Inspect: the header of a full-size FLUX.1-dev transformer GGUF (Q8_0, city96's choice of
   F32 tensors; the data a sparse hole, since only the header is read): ``ckpt inspect``
   against opening it with ``gguf.GGUFReader`` (what ComfyUI-GGUF's loader does first).
2. Dequantize: the first double blocks of that transformer, with random blocks (valid
   scales), to a bf16 safetensors file: ``ckpt convert --dtype bf16`` against the gguf
   package's way (``GGUFReader``, ``gguf.quants.dequantize`` per tensor, torch's cast,
   ``safetensors.torch.save_file``). Both outputs are compared tensor by tensor first.

Child processes, same run; wall time, CPU time, peak RSS, and MB/s of stored GGUF bytes
(``--no-fsync``: like for like with ``save_file``, which does not sync).

    .venv/bin/python bench/quant_read_bench.py [--workdir bench/out] [--blocks 2]
        [--types Q8_0,Q4_K] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import struct
import sys

import numpy as np
import torch
from measure import run, settle
from safetensors import safe_open

from ckptkit.arch.families import families
from ckptkit.ops.sample import sample_table
from ckptkit.quant.ggml_types import BY_NAME

BASELINE = """
import sys, gguf, numpy as np, torch, safetensors.torch as st
reader = gguf.GGUFReader(sys.argv[1])
out = {}
for t in reader.tensors:
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = [int(d) for d in reversed(t.shape)]
    out[t.name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape)
                                   ).to(torch.bfloat16)
st.save_file(out, sys.argv[2])
"""
INSPECT_BASELINE = """
import sys, gguf
reader = gguf.GGUFReader(sys.argv[1])
print(len(reader.tensors), sum(int(t.n_elements) for t in reader.tensors))
"""
SCALES = {"Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "Q5_K": (0, 2), "Q4_0": (0,)}


def flux_shapes() -> dict[str, tuple[int, ...]]:
    return sample_table(families()["flux1-dev"], layout="comfyui",
                        components=["diffusion_model"])


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: str, shapes: dict[str, tuple[int, ...]], qtype: str,
               data: bool) -> int:
    """A GGUF of ``shapes``: 1-D and tensors of at most 1,024 values F32, the rest ``qtype``
    (F16 where rows are not whole blocks); random blocks with valid float16 scales, or a
    sparse hole (``data`` false). Returns the stored bytes."""
    kind = BY_NAME[qtype]
    rng = np.random.default_rng(0)
    infos, offset = [], 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        chosen = BY_NAME["F32"] if len(shape) == 1 or numel <= 1024 else (
            kind if shape[-1] % kind.block_size == 0 else BY_NAME["F16"])
        nbytes = chosen.nbytes(numel)
        infos.append((name, shape, chosen, offset, nbytes))
        offset += -(-nbytes // 32) * 32
    header = b"GGUF" + struct.pack("<IQQ", 3, len(infos), 1)
    header += _string("general.architecture") + struct.pack("<I", 8) + _string("flux")
    for name, shape, chosen, at, _ in infos:
        header += _string(name) + struct.pack("<I", len(shape))
        header += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        header += struct.pack("<IQ", chosen.id, at)
    header += b"\0" * (-len(header) % 32)
    with open(path, "wb") as f:
        f.write(header)
        if not data:
            f.truncate(len(header) + offset)
            return offset
        for _, _, chosen, at, nbytes in infos:
            f.seek(len(header) + at)
            if chosen.is_quantized:
                blocks = rng.integers(0, 256, size=(nbytes // chosen.type_size,
                                                    chosen.type_size), dtype=np.uint8)
                for field in SCALES[chosen.name]:
                    halves = (rng.standard_normal(len(blocks)) * 1e-3).astype(np.float16)
                    blocks[:, field:field + 2] = halves.view(np.uint8).reshape(-1, 2)
                f.write(blocks.tobytes())
            else:
                dtype = np.float32 if chosen.name == "F32" else np.float16
                f.write(rng.standard_normal(nbytes // np.dtype(dtype).itemsize)
                        .astype(dtype).tobytes())
        f.truncate(len(header) + offset)
    return offset


def same_tensors(a: str, b: str) -> bool:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = list(fa.keys())
        return set(keys) == set(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)


def summary(label: str, runs: list[dict[str, float]], stored: int) -> str:
    seconds = statistics.median(r["seconds"] for r in runs)
    rss = max(r["peak_rss"] for r in runs)
    cpu = statistics.median(r["user"] + r["system"] for r in runs)
    return (f"  {label:<34} {seconds:7.2f} s  {stored / seconds / 1e6:6.0f} MB/s  "
            f"CPU {cpu:6.2f} s  peak RSS {rss / 2**20:6.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="bench/out")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--types", default="Q8_0,Q4_K")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = [os.path.join(os.path.dirname(sys.executable), "ckpt")]
    python = [sys.executable, "-c"]
    shapes = flux_shapes()

    header_file = os.path.join(args.workdir, "flux1-dev-Q8_0-header.gguf")
    stored = write_gguf(header_file, shapes, "Q8_0", data=False)
    print(f"inspect: full-size FLUX.1-dev transformer, Q8_0, {len(shapes)} tensors, "
          f"{stored / 1e9:.2f} GB of data (a sparse hole)")
    for label, cmd in (("ckpt inspect", [*ckpt, "inspect", header_file]),
                       ("ckpt inspect --json", [*ckpt, "inspect", "--json", header_file]),
                       ("gguf.GGUFReader", [*python, INSPECT_BASELINE, header_file])):
        runs = [run(cmd) for _ in range(args.repeat)]
        seconds = statistics.median(r["seconds"] for r in runs)
        print(f"  {label:<28} {seconds:8.3f} s  peak RSS "
              f"{max(r['peak_rss'] for r in runs) / 2**20:7.0f} MiB")
    os.unlink(header_file)

    wanted = tuple(f"double_blocks.{i}." for i in range(args.blocks))
    subset = {k: v for k, v in shapes.items() if k.startswith(wanted)}
    for qtype in args.types.split(","):
        path = os.path.join(args.workdir, f"flux-{args.blocks}blocks-{qtype}.gguf")
        stored = write_gguf(path, subset, qtype, data=True)
        ours, theirs = path + ".ckptkit.safetensors", path + ".gguf.safetensors"
        print(f"dequantize to bf16: {args.blocks} FLUX double blocks, {qtype}, "
              f"{sum(math.prod(s) for s in subset.values()) / 1e6:.0f} M parameters, "
              f"{stored / 1e6:.0f} MB stored")
        commands = {
            "ckpt convert --dtype bf16": [*ckpt, "convert", path, "-o", ours, "--dtype",
                                          "bf16", "--quiet"],
            "ckpt convert ... --no-fsync": [*ckpt, "convert", path, "-o", ours, "--dtype",
                                            "bf16", "--quiet", "--no-fsync"],
            "gguf package + save_file": [*python, BASELINE, path, theirs]}
        results: dict[str, list] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                settle([path], [ours, theirs])
                results[name].append(run(cmd))
        run([*ckpt, "convert", path, "-o", ours, "--dtype", "bf16", "--quiet"])
        if not same_tensors(ours, theirs):
            raise SystemExit("the two outputs differ")
        for name, runs in results.items():
            print(summary(name, runs, stored))
        base = results["gguf package + save_file"]
        for name in list(commands)[:2]:
            ratio = statistics.median(a["seconds"] / b["seconds"] for a, b in
                                      zip(results[name], base, strict=True))
            print(f"  {name}: {ratio:.2f}x the gguf package's time")
        print("  outputs identical")
        for leftover in (path, ours, theirs):
            if os.path.exists(leftover):
                os.unlink(leftover)


if __name__ == "__main__":
    main()
