"""``ckpt sample FAMILY -o PATH``: a synthetic model with a family's exact key names (a
diffusers pipeline folder with ``--layout diffusers``)."""

from __future__ import annotations

from ..arch.families import families
from ..formats.dtypes import CLI_NAMES
from ..ops.sample import LAYOUTS, sample
from ..safe_text import json_dumps
from .fmt import human_count
from .progress import add_output_options, progress_for


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sample", help="write a synthetic model with the exact key names of a family",
        description="Write a synthetic checkpoint of FAMILY: full-size shapes with random "
                    "weights (or zero-filled holes with --sparse), or --tiny (the real key "
                    "names, narrow widths) for tests.")
    parser.add_argument("family", metavar="FAMILY",
                        help=f"one of: {', '.join(families())} (or a usual name: sd15, "
                             "sdxl-base, flux-dev, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH",
                        help="the file to write (a new folder for a diffusers pipeline)")
    parser.add_argument("--layout", choices=LAYOUTS, default="ldm",
                        help="ldm: one monolithic file with the original prefixes (default); "
                             "kohya: kohya sd-scripts' layout (sd1, sdxl); comfyui: one "
                             "component with bare keys; diffusers: a pipeline folder "
                             "(model_index.json, configs, scheduler), or one file of "
                             "diffusers names with a single --components")
    parser.add_argument("--components", help="comma-separated subset, e.g. diffusion_model,vae")
    parser.add_argument("--variant", help="inpaint, pix2pix (SD UNets), fill, depth (FLUX)")
    parser.add_argument("--dtype", choices=list(CLI_NAMES), default="fp16")
    parser.add_argument("--tiny", action="store_true", help="narrow widths, same key names")
    parser.add_argument("--sparse", action="store_true",
                        help="zero-filled holes instead of values (instant, for header tests)")
    parser.add_argument("--format", choices=("safetensors", "ckpt"),
                        help="default: the one the output's extension names (.ckpt, .pt, "
                             ".pth, .bin: ckpt), else safetensors")
    parser.add_argument("--seed", type=int, default=0)
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    with progress_for(args, "sample") as bar:
        counts = sample(args.family, args.output, layout=args.layout, dtype=args.dtype,
                        tiny=args.tiny, sparse=args.sparse,
                        components=args.components.split(",") if args.components else None,
                        fmt=args.format, variant=args.variant, seed=args.seed, progress=bar)
    if args.json:
        print(json_dumps({"output": args.output, **counts}))
    else:
        print(f"wrote {args.output}: {counts['family']} ({args.layout} layout"
              f"{', tiny' if args.tiny else ''}), {counts['tensors']:,} tensors, "
              f"{human_count(counts['parameters'])} parameters")
    return 0
