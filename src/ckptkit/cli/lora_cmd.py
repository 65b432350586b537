"""``ckpt lora SUBCOMMAND``: what to do with LoRAs (and other adapters), one subcommand each.

Each subcommand is one ``_add_<name>`` function that declares its parser and one ``_<name>``
function that runs it; ``SUBCOMMANDS`` lists the adders, so a new one is a function and a
line. Errors are the usual one line and exit code (``ckptkit.errors``); a file a command
reads the file's own text from (module names, metadata) is printed through ``printable``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from typing import Any

from ..errors import CkptError, UsageError, counted, worse_exit
from ..formats import open_checkpoint
from ..formats.dtypes import CLI_NAMES
from ..lora.bake import NotApplied, bake, parse_spec
from ..lora.check import applies, check_file
from ..lora.convert import FORMATS, convert_file
from ..ops.inspect import identify_checkpoint
from ..safe_text import json_dumps, printable
from . import lora_rank_cmd
from .failure import report_failure
from .fmt import warn_values
from .progress import add_fsync_option, add_output_options, progress_for

CHECK_EPILOG = """exit codes: 0 every module of every LoRA applies (without --against: every
module is whole), 1 some do not, 2 bad usage, 3 a file is unreadable or no LoRA, 4 unsafe.

reasons a module does not apply: the LoRA is for another family; the model lacks the
component (a text encoder a diffusion-model file does not hold); the adapter type is not
supported ((IA)^3, which ComfyUI and diffusers do not apply either); no layer of the model
has the module's name; the model stores the weight transposed; the shapes do not fit (a
rank mismatch inside the module, another width)."""


def add_parser(commands) -> None:
    p = commands.add_parser(
        "lora", help="LoRAs and other adapters: check them against a model, convert them",
        description="Work with LoRAs and the other adapters (LoCon, LoHa, LoKr, DoRA, GLoRA, "
                    "OFT/BOFT, (IA)^3, full diffs) of every key format ckptkit reads.")
    sub = p.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)


# --- check ---------------------------------------------------------------------------------


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check", help="what a LoRA is, and which of its modules apply to a model",
        description="For each LoRA: its key format, its modules by adapter type, ranks and "
                    "alphas, the components it adapts and the family it was trained for. "
                    "With --against MODEL (a checkpoint, a diffusion model or a text encoder, "
                    "in any layout): how many modules find their weight with the right shape, "
                    "and each group that does not, with the reason. Headers only.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loras", nargs="+", metavar="LORA")
    p.add_argument("--against", metavar="MODEL", help="the model to check the LoRAs against")
    p.add_argument("--json", action="store_true", help="one JSON object per LoRA, per line")
    p.add_argument("--quiet", action="store_true", help="one line per LoRA")
    p.set_defaults(run=_check)


def _check(args) -> int:
    if args.against and os.path.isdir(args.against):
        raise UsageError("--against takes a weights file; for a diffusers folder, give the "
                         "file of the component to check (unet/, transformer/, text_encoder/)",
                         args.against)
    if args.against:
        with open_checkpoint(args.against) as model:
            ident = identify_checkpoint(model)
            return _check_all(args, model, ident)
    return _check_all(args, None, None)


def _check_all(args, model, ident) -> int:
    failed = 0  # the worst error's exit code
    unapplied = False
    for path in args.loras:
        try:
            report = check_file(path, model, ident)
        except CkptError as exc:
            failed = worse_exit(failed, report_failure(exc, args.json, path=path))
            continue
        unapplied |= not applies(report)
        if args.json:
            print(json_dumps(report))
        elif args.quiet:
            print(printable(_one_line(report)))
        else:
            _print_check(report)
    return failed or int(unapplied)


def _one_line(report: dict[str, Any]) -> str:
    against = report.get("against")
    broken = len(report["broken"])
    if against:
        text = f"{against['matched']:,} of {report['modules']:,} modules apply"
        if against["groups"]:
            text += "; not: " + "; ".join(f"{g['modules']:,} {g['why']} ({g['detail']})"
                                          for g in against["groups"])
    else:
        text = f"{counted(report['modules'], 'module')}, {report['family'] or 'family unknown'}"
    if broken:
        text += f"; {counted(broken, 'module')} with tensors that do not fit together"
    return f"{report['path']}: {text}"


def _print_check(report: dict[str, Any]) -> None:
    def out(label: str, text: str) -> None:
        print(printable(f"  {label:<12}{text}"))

    print(printable(report["path"]))
    out("key format", f"{report['key_format_name']}; tensors {report['tensor_format']}")
    out("family", report["family"] or "not told by the weights (see reasons: --json)")
    out("components", ", ".join(report["components"]) or "-")
    adapters = ", ".join(f"{n:,} {a}" for a, n in report["adapters"].items())
    out("modules", f"{report['modules']:,} ({adapters})")
    out("ranks", ", ".join(str(r) for r in report["ranks"]) or "-")
    alphas = report["alphas"]
    out("alphas", ", ".join(f"{a:g}" if isinstance(a, float) else str(a) for a in alphas)
        if alphas else "none stored (scale 1)")
    if report["leftover_keys"]:
        out("other keys", f"{report['leftover_keys']:,} in no adapter module")
    for item in report["broken"][:5]:
        out("BROKEN", f"{item['module']}: {item['reason']}")
    if len(report["broken"]) > 5:
        out("BROKEN", f"... and {len(report['broken']) - 5:,} more")
    against = report.get("against")
    if not against:
        return
    out("against", f"{against['model']}: {against['family'] or against['kind']} "
        f"{against['kind']}, {against['layout']} layout ({', '.join(against['components'])})")
    out("applies", f"{against['matched']:,} of {report['modules']:,} modules")
    for group in against["groups"]:
        names = ", ".join(group["names"]) + (", ..." if group["modules"] > len(group["names"])
                                             else "")
        out("NOT APPLIED", f"{counted(group['modules'], 'module')}: {group['why']}: "
            f"{group['detail']}")
        out("", f"  {names}")
        if group["example"]:
            out("", f"  e.g. {group['example']}")


# --- convert -------------------------------------------------------------------------------


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="rename a LoRA's keys into kohya, ComfyUI or diffusers naming",
        description="Write a LoRA in another key format, for any family: modules renamed, "
                    "fused q/k/v split (the down factor shared, the up rows sliced: exact) or "
                    "separate q/k/v fused (downs stacked, ups block-diagonal: exact, the rank "
                    "adds up), alphas kept so that the effect is the same. A round trip "
                    "without fusing gives the same bytes. The diffusers format has no alpha: "
                    "alpha/rank is folded into lora_A there.",
        epilog="exit codes: 0 written; 2 bad usage, or an adapter the target format cannot "
               "hold (LoHa, LoKr, ... in diffusers; a LoKr to split); 3 unreadable or no "
               "LoRA; 5 output not writable.")
    p.add_argument("lora", metavar="LORA")
    p.add_argument("--to", required=True, choices=FORMATS, help="the key format to write")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--family", help="the family the LoRA is for, when its weights do not "
                                    "tell (e.g. a LoRA of text encoders only)")
    add_output_options(p)
    add_fsync_option(p)
    p.set_defaults(run=_convert)


def _convert(args) -> int:
    with progress_for(args, "convert") as bar:
        report = convert_file(args.lora, args.output, args.to, family=args.family,
                              progress=bar, fsync=args.fsync)
    if args.json:
        print(json_dumps(report))
    else:
        print(printable(f"wrote {args.output}: {counted(report['modules_in'], 'module')} "
                        f"({report['from']}) as {counted(report['modules_out'], 'module')} "
                        f"({report['to']}), {report['tensors']:,} tensors"))
        for note in report["notes"]:
            print(printable(f"note: {note}"))
    return 0


# --- bake ----------------------------------------------------------------------------------

BAKE_EPILOG = """strengths: LORA:0.8 bakes at 0.8 (text encoders too), LORA:0.8:0.4 the text
encoders at 0.4; negative strengths subtract. Modules of several LoRAs on one weight are
applied in the order given, each in fp32, and the weight is cast and written once.

where tools disagree:
  DoRA at a strength s other than 1: W + s (DoRA(W) - W), a straight line from the model
    (s = 0) to the adapter as trained (s = 1), as ComfyUI, Forge and AUTOMATIC1111 apply
    it (PEFT scales the change inside the normalisation, LyCORIS the magnitude ratio); the
    norm is that of the adapted weight, per output row or per input column as the
    magnitude's shape says.
  OFT/BOFT: the Cayley generator's norm clamped to alpha x out_features, as kohya's and
    LyCORIS's trainers do (ComfyUI clamps to alpha alone); strength blends each rotation
    toward the identity.

exit codes: 0 written; 1 some module lands nowhere in MODEL (nothing written; see ckpt lora
check --against MODEL; --allow-unmatched bakes the others); 2 bad usage; 3 an input is
unreadable or no LoRA; 4 unsafe; 5 the output cannot be written."""


def _add_bake(sub) -> None:
    p = sub.add_parser(
        "bake", help="apply LoRAs to a model's weights, streamed",
        description="Bake LoRAs (any format; LoRA, LoCon, LoHa, LoKr, DoRA, GLoRA, OFT, "
                    "BOFT, full diffs) into MODEL (a checkpoint, a diffusion model or a text "
                    "encoder, in any layout, SD 1.x/2.x, SDXL, SD3, FLUX). Every module is "
                    "matched before anything is read; each weight is read once, patched by "
                    "every module in fp32, cast and written once; the rest is copied. The "
                    "output's metadata names each LoRA with its SHA-256 and strengths.",
        epilog=BAKE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH[:TE_STRENGTH]]")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--dtype", choices=list(CLI_NAMES),
                   help="output precision of floating tensors (default: the model's; values "
                        "beyond the range clamped and counted)")
    p.add_argument("--vae-dtype", choices=list(CLI_NAMES),
                   help="the VAE's precision (default: --dtype, but SDXL's VAE, which "
                        "overflows in fp16, stays as it is)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="bake the modules that apply and leave out the others (named)")
    p.add_argument("--hash", action="store_true",
                   help="also hash MODEL for the output's metadata (the LoRAs always are)")
    add_output_options(p)
    add_fsync_option(p)
    p.set_defaults(run=_bake)


def _bake(args) -> int:
    try:
        with progress_for(args, "bake") as bar:
            report = bake(args.model, [parse_spec(s) for s in args.loras], args.output,
                          dtype=args.dtype, vae_dtype=args.vae_dtype,
                          allow_unmatched=args.allow_unmatched,
                          hash_model=args.hash, progress=bar, fsync=args.fsync)
    except NotApplied as exc:  # the JSON object says which modules too
        return report_failure(exc, args.json, unmatched=exc.groups)
    if args.json:
        print(json_dumps({"output": args.output, **asdict(report)}))
        return 0
    applied = sum(r.applied for r in report.loras)
    print(printable(f"wrote {args.output}: {counted(applied, 'module')} of "
                    f"{counted(len(report.loras), 'LoRA')} baked into "
                    f"{counted(report.patched, 'tensor')}, {report.copied:,} copied"))
    warn_values(report.clamped, f"beyond {args.dtype}'s range and clamped")
    for note in report.notes:
        print(printable(f"note: {note}"))
    return 0


SUBCOMMANDS = (_add_check, _add_convert, _add_bake, lora_rank_cmd.add_extract,
               lora_rank_cmd.add_resize, lora_rank_cmd.add_merge)
