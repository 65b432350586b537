"""``ckpt prune CHECKPOINT -o OUT``: drop EMA and leftovers, cast, drop components."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ..formats.dtypes import CLI_NAMES
from ..ops.prune import prune
from .progress import add_fsync_option, add_hash_option, add_output_options, progress_for


def add_parser(commands) -> None:
    p = commands.add_parser(
        "prune", help="drop EMA weights and training leftovers, cast, drop components",
        description="Make a training checkpoint into the file people load: EMA copies "
                    "dropped (or swapped in with --ema use), noise-schedule and loss tensors "
                    "removed, floating tensors cast (out-of-range values clamped and "
                    "counted; integer and marker tensors untouched).")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--dtype", choices=list(CLI_NAMES), help="cast floating tensors")
    p.add_argument("--vae-dtype", choices=list(CLI_NAMES),
                   help="the VAE's precision (default: --dtype, but SDXL's VAE, in base and "
                   "refiner checkpoints, stays as is)")
    p.add_argument("--ema", choices=("drop", "use", "keep"), default="drop",
                   help="drop EMA copies (default), use them as the weights, or keep them")
    p.add_argument("--drop", nargs="+", default=[], metavar="COMPONENT",
                   help="components to leave out, e.g. clip_l vae")
    add_output_options(p)
    add_hash_option(p)
    add_fsync_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    bar = progress_for(args, "prune")
    try:
        report = prune(args.checkpoint, args.output, dtype=args.dtype,
                       vae_dtype=args.vae_dtype, ema=args.ema, drop=args.drop, progress=bar,
                       hash_sources=args.hash, fsync=args.fsync)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"output": args.output, **asdict(report)}))
        return 0
    dropped = ", ".join(f"{n} {g}" for g, n in report.dropped.items()) or "nothing"
    print(f"wrote {args.output}: {report.kept:,} tensors kept ({report.cast:,} cast), "
          f"dropped {dropped}; EMA {report.ema}")
    for note in report.notes:
        print(f"note: {note}")
    if report.clamped:
        targets = " or ".join(dict.fromkeys(d for d in (args.dtype, args.vae_dtype) if d))
        print(f"warning: {sum(report.clamped.values()):,} values in {len(report.clamped)} "
              f"tensors were beyond {targets}'s range and were clamped", file=sys.stderr)
    return 0
