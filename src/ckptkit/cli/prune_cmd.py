"""``ckpt prune CHECKPOINT -o OUT``: drop EMA and leftovers, cast, drop components."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..errors import counted
from ..formats.dtypes import CLI_NAMES
from ..ops.prune import prune
from ..safe_text import json_dumps, printable
from .fmt import warn_values
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
    p.add_argument("--drop", action="append", type=_names, default=[], metavar="COMPONENT",
                   help="components to leave out: a comma-separated list or the option "
                   "repeated, e.g. --drop clip_l,vae or --drop clip_l --drop vae")
    add_output_options(p)
    add_hash_option(p)
    add_fsync_option(p)
    p.set_defaults(run=run)


def _names(text: str) -> list[str]:
    """One ``--drop`` value: a comma-separated list of component names. (One value per
    option, so that ``--drop vae in.safetensors`` leaves the file name to the command.)"""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "component names")
    return names


def run(args) -> int:
    drop = [name for names in args.drop for name in names]
    with progress_for(args, "prune") as bar:
        report = prune(args.checkpoint, args.output, dtype=args.dtype,
                       vae_dtype=args.vae_dtype, ema=args.ema, drop=drop, progress=bar,
                       hash_sources=args.hash, fsync=args.fsync)
    if args.json:
        print(json_dumps({"output": args.output, **asdict(report)}))
        return 0
    dropped = ", ".join(f"{g} ({counted(n, 'tensor')})" for g, n in report.dropped.items())
    print(f"wrote {printable(args.output)}: {counted(report.kept, 'tensor')} kept "
          f"({report.cast:,} cast), dropped {dropped or 'nothing'}; EMA {report.ema}")
    for note in report.notes:
        print(f"note: {printable(note)}")
    targets = " or ".join(dict.fromkeys(d for d in (args.dtype, args.vae_dtype) if d))
    warn_values(report.clamped, f"beyond {targets}'s range and clamped")
    return 0
