"""``ckpt merge METHOD A B [C ...] -o OUT``: every community merge method, streamed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..formats.dtypes import CLI_NAMES
from ..ops.merge import MISSING, merge
from ..ops.merge_methods import METHODS
from .progress import add_output_options, progress_for


def _methods_help() -> str:
    lines = ["methods (A is the first model; parameters with their defaults):"]
    for m in METHODS.values():
        params = ", ".join(f"--{k} {v:g}" for k, v in m.defaults.items()) or "no parameters"
        lines.append(f"  {m.name:<18} {m.inputs:>2} models  {m.formula}  [{params}]")
    return "\n".join(lines)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "merge", help="merge models key by key (weighted sum, add difference, TIES, ...)",
        description="Merge models of the same family, one tensor at a time, in fp32. "
                    "Every input is identified and every shape checked before any tensor is "
                    "read; integer and marker tensors are copied from A; the recipe goes "
                    "into the output's metadata.",
        epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=list(METHODS), metavar="METHOD")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    for name in ("alpha", "beta", "density", "drop"):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--seed", type=int, help="for the random methods (DARE)")
    p.add_argument("--dtype", choices=list(CLI_NAMES),
                   help="output precision of floating tensors (default: model A's)")
    p.add_argument("--compute-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--components", help="merge only these, e.g. diffusion_model; the rest "
                                        "comes from A unchanged")
    p.add_argument("--missing", choices=MISSING, default="take-a",
                   help="keys A has and another model lacks: copy A's, leave out, or stop")
    add_output_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    bar = progress_for(args, "merge")
    params = {"alpha": args.alpha, "beta": args.beta, "density": args.density,
              "drop": args.drop, "seed": args.seed}
    try:
        report = merge(args.method, args.models, args.output, params=params, dtype=args.dtype,
                       compute_dtype=args.compute_dtype,
                       components=args.components.split(",") if args.components else None,
                       missing=args.missing, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"output": args.output, **asdict(report)}))
    else:
        print(f"wrote {args.output}: {report.merged:,} tensors merged, {report.copied:,} "
              f"copied from {args.models[0]}"
              + (f", {report.skipped:,} left out" if report.skipped else ""))
    return 0
