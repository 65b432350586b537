"""``ckpt merge METHOD A B [C ...] -o OUT``: every community merge method, streamed; also
``--recipe FILE.toml``, ``--from-metadata MERGED`` and ``--list-blocks FILE``."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..errors import UsageError
from ..formats.dtypes import CLI_NAMES
from ..ops.merge import MISSING, from_metadata, list_blocks, run_recipe
from ..ops.merge_methods import METHODS, PARAMS
from ..ops.merge_recipe import COMPUTE_DTYPES, from_toml, one_step
from ..safe_text import json_dumps, printable
from .progress import add_fsync_option, add_output_options, progress_for

_PARAMS = ("alpha", "beta", "density", "drop")
_BLOCKS_HELP = ("weights per block: a list in block order, NAME=value items "
                "with globs (IN00=0.3,M00=0.5,OUT*=1; blocks not named keep the default), "
                "or a preset name; see --list-blocks")


def _methods_help() -> str:
    lines = ["methods (A is the first model; parameters with their defaults):"]
    for m in METHODS.values():
        params = ", ".join(f"--{k} {v:g}" for k, v in m.defaults.items()) or "no parameters"
        lines.append(f"  {m.name:<18} {m.inputs:>2} models  {m.formula}  [{params}]")
    lines += ["", "also: ckpt merge --recipe merge.toml -o OUT (several steps, one pass); "
                  "ckpt merge --from-metadata MERGED -o OUT (make a merged file again); "
                  "ckpt merge --list-blocks MODEL"]
    return "\n".join(lines)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "merge", help="merge models key by key (weighted sum, add difference, TIES, ...)",
        description="Merge models of the same family, one tensor at a time, in fp32. "
                    "Every input is identified and every shape checked before any tensor is "
                    "read; integer and marker tensors are copied from A; the recipe, with "
                    "each input's SHA-256, goes into the output's metadata.",
        epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", nargs="?", metavar="METHOD")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("-o", "--output", metavar="OUT.safetensors")
    for name in _PARAMS:  # the ranges come from the one table the recipe check uses
        p.add_argument(f"--{name}", metavar="VALUE", help=f"{PARAMS[name].valid}"
                       + (f" (outside 0..1 it extrapolates), or {_BLOCKS_HELP}"
                          if name == "alpha" else ", or weights per block as for --alpha"))
    p.add_argument("--seed", type=int, help=f"for the random methods (DARE): "
                                            f"{PARAMS['seed'].valid}")
    p.add_argument("--dtype", choices=list(CLI_NAMES),
                   help="output precision of floating tensors (default: model A's)")
    p.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES),
                   help="precision of the arithmetic (default: fp32)")
    p.add_argument("--components", help="merge only these, e.g. diffusion_model; the rest "
                                        "comes from A unchanged")
    p.add_argument("--take", action="append", default=[], metavar="COMPONENT=MODEL",
                   help="take a component unchanged from a model (A, B, ...) or a file, "
                        "e.g. --take vae=A or --take vae=better_vae.safetensors")
    p.add_argument("--missing", choices=MISSING,
                   help="keys A has and another model lacks: copy A's (default), leave out, "
                        "or stop")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--recipe", metavar="FILE.toml", help="run a multi-step recipe")
    p.add_argument("--from-metadata", metavar="MERGED",
                   help="make MERGED again from the recipe in its metadata")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="with --from-metadata: where an input is")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="with --from-metadata: a folder to look for the inputs in")
    p.add_argument("--allow-unverified", action="store_true",
                   help="with --from-metadata: use inputs whose SHA-256 the recipe does not "
                        "record (they could not be hashed then) without checking them")
    p.add_argument("--list-blocks", metavar="MODEL",
                   help="show the block names (and presets) for MODEL's family")
    add_output_options(p)
    add_fsync_option(p)
    p.set_defaults(run=run)


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{option} takes NAME=VALUE, not {item!r}")
        pairs[name] = value
    return pairs


def _param(value: str | None):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value  # per-block weights, parsed once the family is known


def _options(args) -> dict:
    return {"dtype": args.dtype, "compute_dtype": args.compute_dtype,
            "components": args.components.split(",") if args.components else None,
            "missing": args.missing, "device": args.device}


def run(args) -> int:
    if args.list_blocks:
        return _list_blocks(args)
    modes = [m for m in ("recipe", "from_metadata") if getattr(args, m)]
    if len(modes) > 1 or (modes and args.method):
        raise UsageError("give a METHOD and models, or --recipe, or --from-metadata; "
                         "one of them")
    if not args.output:
        raise UsageError("merge needs -o OUT")
    if args.from_metadata:
        return _finish(args, lambda bar: from_metadata(
            args.from_metadata, args.output, search=args.search,
            given=_pairs(args.input, "--input"), progress=bar, fsync=args.fsync,
            allow_unverified=args.allow_unverified))
    options = {k: v for k, v in _options(args).items() if v is not None}
    if args.recipe:
        recipe = from_toml(args.recipe, **options)
    else:
        if not args.method:
            raise UsageError("merge needs a METHOD and models (see ckpt merge --help)")
        if args.method not in METHODS:
            raise UsageError(f"unknown merge method {args.method!r}; known: "
                             f"{', '.join(METHODS)}")
        params = {n: _param(getattr(args, n)) for n in _PARAMS}
        params["seed"] = args.seed
        recipe = one_step(args.method, args.models, params,
                          take=_pairs(args.take, "--take"), **options)
    return _finish(args, lambda bar: run_recipe(recipe, args.output, bar, args.fsync))


def _finish(args, work) -> int:
    with progress_for(args, "merge") as bar:
        report = work(bar)
    if args.json:
        print(json_dumps({"output": args.output, **asdict(report)}))
    else:
        extra = "".join([f", {report.taken:,} taken" if report.taken else "",
                         f", {report.skipped:,} left out" if report.skipped else ""])
        print(f"wrote {args.output}: {report.merged:,} tensors merged, {report.copied:,} "
              f"copied from the base model{extra}")
        if report.take_left_out:
            counts = ", ".join(f"{n:,} {why}" for why, n in sorted(report.take_left_out.items()))
            print(f"note: left out of the --take components: {counts}")
        for note in report.notes:
            print(f"note: {printable(note)}")
    return 0


def _list_blocks(args) -> int:
    listing = list_blocks(args.list_blocks)
    if args.json:
        print(json_dumps(listing))
        return 0
    print(f"{printable(args.list_blocks)}: {listing['family']}, {len(listing['blocks'])} "
          "blocks (weights are given in this order)")
    for block in listing["blocks"]:  # key prefixes are the file's own text
        print(f"  {block['name']:<8} {block['tensors']:>5} tensors  "
              f"{printable(block['covers'])}")
    if listing["unblocked"]:
        rest = listing["unblocked"]
        print(f"  not merged by blocks (taken from model A when weights are per block): "
              f"{rest['tensors']} tensors  {printable(rest['covers'])}")
    if listing["presets"]:
        print("presets: " + ", ".join(listing["presets"]))
    return 0
