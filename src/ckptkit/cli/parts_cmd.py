"""``ckpt split``, ``ckpt assemble`` and ``ckpt vae bake``: checkpoints and their parts."""

from __future__ import annotations

import sys

from ..errors import counted
from ..ops.parts import assemble, bake_vae, split
from ..safe_text import json_dumps, printable
from .progress import add_fsync_option, add_hash_option, add_output_options, progress_for


def add_parser(commands) -> None:
    p = commands.add_parser(
        "split", help="write each component of a checkpoint as a ComfyUI standalone file",
        description="Write the diffusion model, text encoders and VAE of a monolithic "
                    "checkpoint as separate safetensors files in ComfyUI's folders "
                    "(diffusion_models/, text_encoders/, vae/) and names.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--components", help="comma-separated subset, e.g. vae or clip_l,clip_g")
    _common(p, run_split)

    p = commands.add_parser(
        "assemble", help="build one monolithic checkpoint from a diffusion model and parts",
        description="Identify each part from its header, check that they belong together, "
                    "and write them under the family's original monolithic prefixes.")
    p.add_argument("--diffusion-model", required=True, metavar="FILE")
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="repeat for each text encoder (which one it is is read from the file)")
    p.add_argument("--vae", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--allow-partial", action="store_true",
                   help="write even when components of the family are missing")
    _common(p, run_assemble)

    p = commands.add_parser("vae", help="VAE operations (bake)")
    vae_commands = p.add_subparsers(dest="vae_command", metavar="ACTION",
                                    parser_class=type(commands._parser_class()))
    vae_commands.required = True
    b = vae_commands.add_parser("bake", help="replace the VAE inside a checkpoint")
    b.add_argument("checkpoint", metavar="CHECKPOINT")
    b.add_argument("vae", metavar="VAE")
    b.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    _common(b, run_bake)


def _common(parser, run) -> None:
    add_output_options(parser)
    add_hash_option(parser)
    add_fsync_option(parser)
    parser.set_defaults(run=run)


def run_split(args) -> int:
    with progress_for(args, "split") as bar:
        written = split(args.checkpoint, args.output,
                        args.components.split(",") if args.components else None, progress=bar,
                        hash_sources=args.hash, fsync=args.fsync)
    if args.json:
        print(json_dumps({"input": args.checkpoint, "written": written,
                          "left_out": written.left_out, "warnings": written.warnings}))
    else:
        for path in written:
            print(f"wrote {printable(path)}")
        _note_left_out(written.left_out)
    _warn(written.warnings)
    return 0


def _note_left_out(left_out: dict[str, int], where: str = "") -> None:
    """One line for the keys no output took (EMA copies, training leftovers, markers,
    unexplained keys): they are left out on purpose, and said so."""
    if left_out:
        counts = ", ".join(f"{printable(why)} ({counted(n, 'tensor')})"
                           for why, n in sorted(left_out.items()))
        print(f"note: left out {counts}{where}")


def run_assemble(args) -> int:
    with progress_for(args, "assemble") as bar:
        result = assemble(args.diffusion_model, args.text_encoder, args.vae, args.output,
                          allow_partial=args.allow_partial, progress=bar,
                          hash_sources=args.hash, fsync=args.fsync)
    if args.json:
        print(json_dumps({"output": args.output, **result}))
    else:
        print(f"wrote {printable(args.output)}: {result['family']} with "
              f"{', '.join(result['components'])}"
              + (f" (missing {', '.join(result['missing'])})" if result["missing"] else ""))
        for path, left_out in result.get("left_out", {}).items():
            _note_left_out(left_out, f" of {printable(path)}")
    _warn(result["warnings"])
    return 0


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)


def run_bake(args) -> int:
    with progress_for(args, "vae bake") as bar:
        result = bake_vae(args.checkpoint, args.vae, args.output, progress=bar,
                          hash_sources=args.hash, fsync=args.fsync)
    if args.json:
        print(json_dumps({"output": args.output, **result}))
    else:
        print(f"wrote {printable(args.output)}: {result['family']} with the VAE of "
              f"{printable(args.vae)}")
        _note_left_out(result.get("left_out", {}))
    _warn(result["warnings"])
    return 0
