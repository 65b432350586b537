"""``ckpt convert IN -o OUT.safetensors``: a pickle (or any checkpoint) to safetensors."""

from __future__ import annotations

import json
import sys

from ..errors import CkptError
from ..ops.convert import CONVERT_DTYPES, convert
from .fmt import human_bytes
from .progress import add_fsync_option, add_output_options, progress_for


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", help="convert a checkpoint (.ckpt/.pt/.bin/.safetensors) to safetensors",
        description="Convert a checkpoint to safetensors, streaming one tensor at a time. "
                    "Tensors stay bit-identical unless --dtype asks for a cast; entries of "
                    "pickles that are not weights (optimizer states, counters) are dropped "
                    "and listed. A file without tensors is refused, not written empty.")
    parser.add_argument("input", metavar="IN")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="the output file; a pickle or GGUF name (.ckpt, .pt, .pth, .bin, "
                             ".gguf) is refused, since loaders would not read it as "
                             "safetensors")
    parser.add_argument("--dtype", choices=CONVERT_DTYPES,
                        help="cast floating-point tensors (integer and bool tensors are kept)")
    parser.add_argument("--keep-metadata", action="store_true",
                        help="carry the input's metadata (or a pickle's scalar entries such as "
                             "global_step) into the output")
    add_fsync_option(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    bar = progress_for(args, "convert")
    try:
        report = convert(args.input, args.output, dtype=args.dtype,
                         keep_metadata=args.keep_metadata, progress=bar, fsync=args.fsync)
    except (CkptError, OSError) as exc:
        if args.json:  # like inspect --json: an object on stdout, the error line on stderr
            reason = exc.reason if isinstance(exc, CkptError) else (exc.strerror or str(exc))
            print(json.dumps({"input": args.input, "output": args.output, "error": reason}))
        raise
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"input": args.input, "output": args.output, **vars(report)}))
        return 0
    print(f"wrote {args.output}: {report.tensors:,} tensors, {human_bytes(report.bytes)}"
          + (f", {report.cast:,} cast to {args.dtype}" if report.cast else ""))
    for note in report.notes:
        print(f"note: {note}")
    if report.dropped:
        print(f"note: dropped {len(report.dropped)} entries that are not weights: "
              f"{', '.join(report.dropped[:8])}{', ...' if len(report.dropped) > 8 else ''}")
    if report.dropped_tensors:
        held = sum(report.dropped_tensors.values())
        names = list(report.dropped_tensors)
        print(f"note: {len(names)} of the dropped entries hold {held:,} tensors, not written: "
              f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    if report.overflowed:
        total = sum(report.overflowed.values())
        print(f"warning: {total:,} values in {len(report.overflowed)} tensors were out of "
              f"range for {args.dtype} and became infinite", file=sys.stderr)
    return 0
