"""``ckpt convert IN -o OUT.safetensors``: a pickle (or any checkpoint) to safetensors.

Every line printed from the file's data (its notes, the names of dropped entries, the paths)
goes through ``safe_text``: a key or file name cannot send escape sequences to the terminal.
"""

from __future__ import annotations

from ..errors import counted
from ..ops.convert import CONVERT_DTYPES, convert
from ..safe_text import json_dumps, printable
from .fmt import human_bytes, warn_values
from .progress import add_fsync_option, add_output_options, progress_for


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", help="convert a checkpoint (.ckpt/.pt/.bin/.safetensors) to safetensors",
        description="Convert a checkpoint to safetensors, streaming one tensor at a time. "
                    "Tensors stay bit-identical unless --dtype asks for a cast; the source's "
                    "metadata is kept; entries of pickles that are not weights (optimizer "
                    "states, counters) are dropped and listed. A file without tensors is "
                    "refused, not written empty.")
    parser.add_argument("input", metavar="IN")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="the output file; a pickle or GGUF name (.ckpt, .pt, .pth, .bin, "
                             ".gguf) is refused, since loaders would not read it as "
                             "safetensors")
    parser.add_argument("--dtype", choices=CONVERT_DTYPES,
                        help="cast floating-point tensors (integer and bool tensors are kept; "
                             "to fp8, values beyond its range are clamped and counted)")
    parser.add_argument("--vae-dtype", choices=CONVERT_DTYPES,
                        help="the VAE's precision (default: --dtype, but SDXL's VAE, in base "
                             "and refiner checkpoints, stays as is: it overflows in fp16)")
    metadata = parser.add_mutually_exclusive_group()
    metadata.add_argument("--drop-metadata", action="store_true",
                          help="write none of the input's metadata (by default it is kept: "
                               "a LoRA's training tags, ModelSpec, or a pickle's scalar "
                               "entries such as global_step)")
    metadata.add_argument("--keep-metadata", action="store_true",
                          help="the default; accepted for scripts written when it was not")
    add_fsync_option(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)


def _names(names: list[str]) -> str:
    return printable(", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))


def run(args) -> int:
    with progress_for(args, "convert") as bar:
        report = convert(args.input, args.output, dtype=args.dtype, vae_dtype=args.vae_dtype,
                         keep_metadata=not args.drop_metadata, progress=bar, fsync=args.fsync)
    if args.json:
        print(json_dumps({"input": args.input, "output": args.output, **vars(report)}))
        return 0
    print(printable(f"wrote {args.output}: {counted(report.tensors, 'tensor')}, "
                    f"{human_bytes(report.bytes)}")
          + (f", {report.cast:,} cast to {args.dtype}" if report.cast else ""))
    for note in report.notes:
        print(f"note: {printable(note)}")
    if report.dropped:
        print(f"note: dropped {counted(len(report.dropped), 'entry', 'entries')} that "
              f"{'is not a weight' if len(report.dropped) == 1 else 'are not weights'}: "
              f"{_names(report.dropped)}")
    if report.dropped_tensors:
        held = sum(report.dropped_tensors.values())
        names = list(report.dropped_tensors)
        which = ("1 of the dropped entries holds" if len(names) == 1
                 else f"{len(names):,} of the dropped entries hold")
        print(f"note: {which} {counted(held, 'tensor')}, not written: "
              f"{_names(names)}")
    targets = " or ".join(dict.fromkeys(d for d in (args.dtype, args.vae_dtype) if d))
    warn_values(report.overflowed, f"out of range for {targets} and became infinite")
    warn_values(report.clamped, f"beyond {targets}'s range and clamped")
    return 0
