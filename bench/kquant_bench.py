"""The K-quant kernels alone (``quant.kquants``): values per CPU second for each type, one
torch thread, as ``ckpt quantize`` runs them (slices of ``encode.K_SLICE`` values, each on one
core, temporaries on the heap).

    python bench/kquant_bench.py [--against OTHER/src] [--values 1048576] [--rounds 6]
                                 [--types Q4_K,Q6_K]

``--against`` times another checkout's ``quant/kquants.py`` in the same process, alternated
with this one round by round (the machine may be shared: the best round of each is shown,
CPU seconds beside wall), and checks that both give the same bytes. The values are
weight-like: N(0, 0.02) rounded to bf16, as a bf16 checkpoint's are after the cast to float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import torch

    from ckptkit.engine.slices import heap_for_temporaries
    from ckptkit.quant import kquants
    from ckptkit.quant.encode import K_SLICE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, metavar="SRC",
                        help="another checkout's src folder, timed alternately")
    parser.add_argument("--values", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--types", default=",".join(kquants.K_QUANTIZERS))
    args = parser.parse_args()

    torch.set_num_threads(1)
    versions = {"this": kquants}
    if args.against:
        versions["other"] = _load(args.against / "ckptkit/quant/kquants.py", "other_kquants")
    count = args.values // K_SLICE * K_SLICE or K_SLICE
    x = torch.randn(count, generator=torch.Generator().manual_seed(0)) * 0.02
    x = x.bfloat16().float()

    def run(module, qtype):
        kernel = module.K_QUANTIZERS[qtype]
        cpu, wall = time.process_time(), time.perf_counter()
        out = [kernel(x[s:s + K_SLICE].view(-1, 256)) for s in range(0, count, K_SLICE)]
        return time.process_time() - cpu, time.perf_counter() - wall, torch.cat(out)

    print(f"{count} values, slices of {K_SLICE}, one thread, best of {args.rounds} rounds")
    with heap_for_temporaries():
        for qtype in args.types.split(","):
            best: dict[str, tuple[float, float]] = {}
            outputs = {}
            for _ in range(args.rounds):
                for label, module in versions.items():
                    cpu, wall, outputs[label] = run(module, qtype)
                    old = best.get(label, (float("inf"), float("inf")))
                    best[label] = (min(old[0], cpu), min(old[1], wall))
            line = [f"{qtype:5}"]
            for label, (cpu, wall) in best.items():
                line.append(f"{label}: {count / cpu / 1e6:6.2f} M values/CPU s "
                            f"({count / wall / 1e6:6.2f}/wall s)")
            if "other" in best:
                same = torch.equal(outputs["this"], outputs["other"])
                line.append(f"x{best['other'][0] / best['this'][0]:.2f} CPU, "
                            f"{'same bytes' if same else 'BYTES DIFFER'}")
            print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
