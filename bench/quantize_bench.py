"""``ckpt quantize`` against the gguf package's own quantizer, driven as city96's converter
drives it, on a FLUX.1 [dev]-shaped transformer of random bf16 weights.

    python bench/quantize_bench.py --dir /big/tmp [--rows-divisor 4] [--k-quant Q4_K_M|none]
                                   [--skip-baseline]

The model has FLUX.1 dev's tensors and shapes (ckptkit's key table for it: 23.8 GB in bf16),
in ComfyUI's layout (bare keys). ``--rows-divisor N`` gives its big 2-D weights N times fewer
rows, for a machine that cannot hold the contender's copy of the whole model in memory: every
tensor is still there, each row as long (so the same blocks and the same type choices), and
ckptkit still identifies it as FLUX.1 dev.

Each contender runs as a child process, measured by ``measure.run`` (wall time; GNU time's
peak RSS) and by polling the child's ``RssAnon`` (its private memory: pages of a
mapped input file count in RSS but are page cache, shared and reclaimable):

- ckptkit: ``ckpt quantize MODEL -o OUT.gguf --type Q8_0 --quiet --no-fsync``;
- gguf: ``baseline_gguf`` below, which does what city96's ``tools/convert.py`` does (its
  first version took ``--qtype`` and quantized with the gguf package; today's writes F16/BF16
  and leaves Q8_0 to a patched llama-quantize): ``safetensors.torch.load_file`` of the
  whole model, each tensor to float32 numpy, ``gguf.quants.quantize`` to the same types
  ckptkit chooses, ``GGUFWriter.add_tensor``, then ``write_header_to_file``,
  ``write_kv_data_to_file``, ``write_tensors_to_file``. Neither syncs its output.

The two Q8_0 files are compared tensor by tensor (they must hold the same bytes). Then
ckptkit alone on ``--k-quant`` (no Python contender exists for K-quants): time and bits per
weight. Everything written is deleted at the end (at full size the disk holds the model and
two outputs: 50 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import measure

HERE = Path(__file__).resolve().parent.parent
CKPT = [sys.executable, "-m", "ckptkit.cli.main"]


def make_model(path: Path, divisor: int) -> int:
    """FLUX.1 dev's transformer, random bf16 values, streamed to ``path`` (the 2-D weights of
    3,072 rows or more with ``divisor`` times fewer rows); returns its size in bytes."""
    import torch

    from ckptkit.arch.families import family
    from ckptkit.engine.writer import Planned, write_safetensors
    from ckptkit.formats.dtypes import BY_NAME

    table = family("flux1-dev").components[0].keys(layout="comfyui")

    def shape(dims) -> tuple[int, ...]:
        dims = tuple(dims)
        return (dims[0] // divisor, *dims[1:]) if len(dims) == 2 and dims[0] >= 3072 else dims

    def values(shape, seed):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    shapes = [(k, shape(s)) for k, s in table.items()]
    planned = [Planned(k, BY_NAME["BF16"], s, partial(values, s, i))
               for i, (k, s) in enumerate(shapes)]
    write_safetensors(str(path), planned, {}, fsync=False)
    return path.stat().st_size


def baseline_gguf(src: str, dst: str, qtype_name: str, types_json: str) -> None:
    """The contender (run in a child): city96's converter's steps with the gguf package."""
    import gguf
    import torch
    from safetensors.torch import load_file

    chosen = json.loads(Path(types_json).read_text())
    state_dict = load_file(src)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype_name}"))
    for key, data in state_dict.items():
        qtype = getattr(gguf.GGMLQuantizationType, chosen[key])
        array = data.to(torch.float32).numpy() if data.dtype == torch.bfloat16 else data.numpy()
        writer.add_tensor(key, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def timed(cmd: list[str]) -> dict:
    """``measure.run`` of ``cmd``, with the peak of its private memory (RssAnon of the
    process GNU time runs, polled every 20 ms)."""
    peak = {"anon": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for pid in _children(os.getpid()):
                peak["anon"] = max(peak["anon"], _anon(pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        result = measure.run(cmd)
    finally:
        done.set()
        watcher.join()
    return {**result, "peak_private": peak["anon"]}


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a folder with room for the model and "
                        "one output (25 GB and 13 GB at full size)")
    parser.add_argument("--rows-divisor", type=int, default=1, metavar="N")
    parser.add_argument("--k-quant", default="Q4_K_M", help="a K mix to time too, or none")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="ckptkit alone: the contender holds the whole model in memory "
                             "(25 GB at full size), which ckptkit does not need")
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    model, out = work / "flux-bench.safetensors", work / "flux-bench.gguf"
    theirs_out = work / "flux-bench-gguf.gguf"
    started = time.perf_counter()
    size = make_model(model, args.rows_divisor)
    print(f"model: FLUX.1 dev's tensors, big weights' rows / {args.rows_divisor}, "
          f"{size / 1e9:.2f} GB bf16 (written in {time.perf_counter() - started:.0f} s)")
    rows = []
    try:
        measure.settle([str(model)], [str(out)])
        ours = timed([*CKPT, "quantize", str(model), "-o", str(out), "--type", "Q8_0",
                      "--quiet", "--no-fsync", "--json"])
        rows.append(("ckptkit Q8_0", ours, out.stat().st_size))
        if not args.skip_baseline:
            chosen = work / "types.json"
            chosen.write_text(json.dumps(_types(out)))
            measure.settle([str(model)], [])
            theirs = timed([sys.executable, __file__, "--baseline", str(model),
                            str(theirs_out), "Q8_0", str(chosen)])
            rows.append(("gguf package Q8_0", theirs, theirs_out.stat().st_size))
            print(f"same tensor bytes in both files: {_same_tensors(out, theirs_out)}")
        measure.settle([str(model)], [str(out), str(theirs_out)])
        if args.k_quant != "none":
            k = timed([*CKPT, "quantize", str(model), "-o", str(out), "--type",
                       args.k_quant, "--quiet", "--no-fsync"])
            rows.append((f"ckptkit {args.k_quant}", k, out.stat().st_size))
            print(f"{args.k_quant}: {8 * out.stat().st_size / _parameters(model):.2f} bits "
                  "per weight over the whole file")
    finally:
        for path in (out, theirs_out, model, work / "types.json"):
            if path.exists():
                path.unlink()
    print(f"{'':22} {'seconds':>8} {'user s':>8} {'sys s':>7} {'peak RSS':>10} "
          f"{'private':>10} {'output':>9}")
    for name, r, nbytes in rows:
        print(f"{name:22} {r['seconds']:8.1f} {r['user']:8.1f} {r['system']:7.1f} "
              f"{r['peak_rss'] / 1e9:8.2f}GB {r['peak_private'] / 1e9:8.2f}GB "
              f"{nbytes / 1e9:7.2f}GB")
    if not args.skip_baseline:
        ours, theirs = rows[0][1], rows[1][1]
        cpu = (ours['user'] + ours['system']) / (theirs['user'] + theirs['system'])
        print(f"ckptkit / gguf package, Q8_0: time {ours['seconds'] / theirs['seconds']:.2f}x, "
              f"CPU (user + sys) {cpu:.2f}x, "
              f"private memory {ours['peak_private'] / theirs['peak_private']:.3f}x")


def _types(path: Path) -> dict[str, str]:
    from ckptkit import open as ckpt_open

    with ckpt_open(path) as ck:
        return {k: getattr(t, "qtype", "") or t.dtype.name for k, t in ck.items()}


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors, names, types and bytes (their metadata
    differs: ckptkit adds its provenance keys)."""
    import gguf
    import numpy as np

    ours, theirs = gguf.GGUFReader(str(a)).tensors, gguf.GGUFReader(str(b)).tensors
    return len(ours) == len(theirs) and all(
        x.name == y.name and x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data)
        for x, y in zip(ours, theirs, strict=True))


def _parameters(path: Path) -> int:
    from ckptkit import open as ckpt_open

    with ckpt_open(path) as ck:
        return sum(t.numel for t in ck.values())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--baseline"]:
        baseline_gguf(*sys.argv[2:6])
    else:
        main()
