"""``ckpt lora extract``, ``ckpt lora resize`` and ``ckpt lora merge``: the subcommands of
the ``ckpt lora`` group built on low-rank math (``lora.lowrank``); one function adds each."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..errors import counted
from ..lora import extract as extract_op
from ..lora import lowrank
from ..lora import merge as merge_op
from ..lora import resize as resize_op
from ..lora.factored import describe
from ..lora.names import FORMATS
from ..safe_text import json_dumps, printable
from .progress import add_fsync_option, add_hash_option, add_output_options, progress_for


def _common(p) -> None:
    add_output_options(p)
    add_hash_option(p)
    add_fsync_option(p)


def _rank_options(p, rules, *, rank: str, conv_rank: str, dynamic: str,
                  required: bool = False) -> None:
    """``--rank``, ``--conv-rank``, ``--dynamic`` (one of ``rules``) and ``--value``, which
    extract and resize both take, with their own help."""
    p.add_argument("--rank", type=int, required=required, help=rank)
    p.add_argument("--conv-rank", type=int, help=conv_rank)
    p.add_argument("--dynamic", choices=rules, help=dynamic)
    p.add_argument("--value", type=float, metavar="V", help="the --dynamic rule's value")


def _components(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "component names")
    return names


def add_extract(commands) -> None:
    p = commands.add_parser(
        "extract", help="the difference of two models as a LoRA",
        description="The difference TUNED - BASE of two models of one family (any file "
                    "layout) as a LoRA, LoCon for k x k convolutions, one module at a time. "
                    "Each module's difference is truncated to its rank by a randomized SVD "
                    f"({lowrank.OVERSAMPLE} extra columns, {lowrank.POWER_ITERATIONS} power "
                    "iterations): its error is within 1% of the best a rank can do (a full "
                    "SVD truncated), at a small part of the cost. Modules that did not change "
                    f"are left out, and so are text encoders no weight of which moved by more "
                    f"than {extract_op.MIN_DIFF} (kohya's rule). Factors are not clamped "
                    "(kohya clamps them to their 99th percentile). The share of each "
                    "component's difference the LoRA keeps (Frobenius) is reported and "
                    "stored in the metadata (ckptkit.retained).")
    p.add_argument("base", metavar="BASE")
    p.add_argument("tuned", metavar="TUNED")
    p.add_argument("-o", "--output", required=True, metavar="LORA.safetensors")
    _rank_options(
        p, lowrank.EXTRACT_RULES, required=True,
        rank="rank of each module (with --dynamic: the most it may take)",
        conv_rank="rank of k x k convolutions (LoCon; default: --rank; 0 leaves them out, as "
                  "kohya does by default)",
        dynamic="rank per module by its singular values (LyCORIS's rules): ratio: those "
                "above V x the largest; threshold: those above V; quantile: until their sum "
                "reaches V of the total (needs every singular value: slower); fro: until V "
                "of the Frobenius norm is kept (kohya's sv_fro)")
    p.add_argument("--components", type=_components,
                   help="extract only these, e.g. diffusion_model or clip_l,clip_g")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="kohya",
                   help="key names: kohya (default; ComfyUI, AUTOMATIC1111/Forge and "
                        "diffusers load it), comfyui (diffusion_model.*), diffusers "
                        "(unet./transformer. with lora_A/lora_B)")
    p.add_argument("--dtype", choices=extract_op.DTYPES, default="fp16",
                   help="precision of the LoRA (default fp16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    _common(p)
    p.set_defaults(run=_extract)


def add_resize(commands) -> None:
    p = commands.add_parser(
        "resize", help="a LoRA at another rank (kohya's rules, exact)",
        description="LoRA and LoCon modules at a new rank, by the exact SVD of up @ down "
                    "(QR factors of up and down and an r x r SVD: no SVD of the full "
                    "matrix); alpha is rescaled so that the effect at strength 1 stays (new "
                    "alpha = old scale x new rank, kohya's rule; files without alpha tensors "
                    "get the scale in their factors). Names, dtypes and other tensors stay as "
                    "they are; other adapter types (LoHa, LoKr, DoRA, full diffs, ...) are "
                    "copied unchanged, and said so.")
    p.add_argument("lora", metavar="LORA")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    _rank_options(
        p, lowrank.KOHYA_RULES,
        rank="new rank (at most each module's own); with --dynamic, the most a module may "
             "keep",
        conv_rank="new rank of k x k convolutions (default: --rank)",
        dynamic="rank per module as kohya's resize_lora.py: sv_ratio (largest / smallest "
                "kept singular value at most V), sv_fro (V of the Frobenius norm kept), "
                "sv_cumulative (V of the sum of singular values kept)")
    _common(p)
    p.set_defaults(run=_resize)


def add_merge(commands) -> None:
    p = commands.add_parser(
        "merge", help="several LoRAs as one: the sum of their changes",
        description="The weighted sum of the LoRAs' changes, layer by layer (modules matched "
                    "by the layer they change, whatever their key format): --concat keeps "
                    "it exactly (ranks add up); --rank R truncates it by the exact SVD of the "
                    "summed factors. A module whose rank would exceed half the layer's "
                    "smaller side is written as one full .diff (which ComfyUI and "
                    "AUTOMATIC1111 read). kohya's merge_lora.py without --concat adds ups and "
                    "downs separately, which is not the sum of the changes. LoRA and LoCon "
                    "modules only.")
    p.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="truncate each module's sum to this rank")
    how.add_argument("--concat", action="store_true",
                     help="keep the sum exactly: the factors side by side")
    _common(p)
    p.set_defaults(run=_merge)


def _span(ranks: dict[str, int]) -> str:
    """"64", or "12-64" where the modules' ranks differ."""
    low, high = ranks["min"], ranks["max"]
    return str(low) if low == high else f"{low}-{high}"


def _run(args, label: str, work) -> int:
    """Runs ``work(bar)`` under a progress bar."""
    with progress_for(args, label) as bar:
        return work(bar)


def _extract(args) -> int:
    options = extract_op.Options(
        rank=args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic, value=args.value,
        components=tuple(args.components) if args.components else None, fmt=args.fmt,
        dtype=args.dtype, device=args.device)

    def work(bar) -> int:
        report = extract_op.extract(args.base, args.tuned, args.output, options, progress=bar,
                                    fsync=args.fsync, hash_sources=args.hash)
        if args.json:
            print(json_dumps({"output": args.output, **asdict(report)}))
            return 0
        kept = ", ".join(f"{share:.1%} of the {name}'s" for name, share in
                         report.retained.items())
        print(f"wrote {printable(args.output)}: {counted(report.modules, 'module')} of "
              f"{report.family}, rank {_span(report.ranks)}, {args.fmt} names; the LoRA keeps "
              f"{kept} difference (Frobenius)")
        for name, why in report.left_out.items():
            print(f"note: {name} left out: {printable(why)}")
        if report.unchanged_modules:
            print(f"note: {counted(report.unchanged_modules, 'layer')} did not change")
        held = sum(report.not_held.values())
        if held:
            print(f"note: {counted(held, 'other tensor')} (biases, norms, embeddings) changed "
                  "too; a LoRA does not hold them")
        convs = sum(report.convs_left_out.values())
        if convs:
            print(f"note: {counted(convs, 'k x k convolution')} changed and left out "
                  "(--conv-rank 0); the shares above leave them out")
        if report.unnamed:
            print(f"note: {counted(report.unnamed, 'layer')} that changed {args.fmt} has no "
                  "name for: left out")
        return 0

    return _run(args, "extract", work)


def _resize(args) -> int:
    options = resize_op.Options(rank=args.rank, conv_rank=args.conv_rank,
                                dynamic=args.dynamic, value=args.value)

    def work(bar) -> int:
        report = resize_op.resize(args.lora, args.output, options, progress=bar,
                                  fsync=args.fsync, hash_sources=args.hash)
        if args.json:
            print(json_dumps({"output": args.output, **asdict(report)}))
            return 0
        print(f"wrote {printable(args.output)}: {counted(report.resized, 'module')} from rank "
              f"{_span(report.old_ranks)} to {_span(report.ranks)}, keeping "
              f"{report.retained:.1%} of their change (Frobenius)")
        for adapter, n in report.kept.items():
            print(f"note: {counted(n, 'module')} copied unchanged: {describe(adapter)} has no "
                  "rank a resize applies to" if adapter != "dora" else
                  f"note: {counted(n, 'module')} copied unchanged: {describe(adapter)}")
        return 0

    return _run(args, "resize", work)


def _merge(args) -> int:
    inputs = [merge_op.parse_input(text) for text in args.loras]

    def work(bar) -> int:
        report = merge_op.merge(inputs, args.output, rank=args.rank, concat=args.concat,
                                progress=bar, fsync=args.fsync, hash_sources=args.hash)
        if args.json:
            print(json_dumps({"output": args.output, **asdict(report)}))
            return 0
        rank = f", rank {_span(report.ranks)}" if report.ranks else ""
        print(f"wrote {printable(args.output)}: {counted(report.modules, 'module')} "
              f"({report.shared:,} in more than one LoRA){rank}, keeping "
              f"{report.retained:.1%} of the summed change (Frobenius)")
        if report.diffs:
            print(f"note: {counted(report.diffs, 'module')} written as a full .diff (a rank "
                  "above half the layer's smaller side)")
        return 0

    return _run(args, "lora merge", work)
