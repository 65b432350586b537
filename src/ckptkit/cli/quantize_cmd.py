"""``ckpt quantize MODEL -o OUT.gguf --type Q4_K_M`` (or ``-o OUT.safetensors --type
fp8-scaled|nf4|fp4``): a diffusion model quantized on the CPU, every tensor checked after
writing."""

from __future__ import annotations

from dataclasses import asdict

from ..errors import counted
from ..ops.gguf_rules import TYPES
from ..ops.quantize import FP8_FORMATS, SAFETENSORS_TYPES, quantize
from ..safe_text import json_dumps, printable
from .fmt import human_bytes, human_count
from .progress import add_fsync_option, add_hash_option, add_output_options, progress_for


def add_parser(commands) -> None:
    p = commands.add_parser(
        "quantize", help="quantize a diffusion model to GGUF (ComfyUI-GGUF), fp8 scaled or NF4",
        description="Quantize the diffusion model of a checkpoint on the CPU, no llama.cpp "
                    "needed: GGUF types with ComfyUI-GGUF's per-family rules (embedders and "
                    "final layers kept, _M mixes upgrading value, qkv and feed-forward "
                    "weights, SD convolutions reshaped with their shapes in the metadata), or "
                    "ComfyUI's per-layer fp8 with float32 scales, or bitsandbytes' NF4/FP4 "
                    "(blocks of 64, double-quantised absmax) as Forge loads it. Every "
                    "tensor is dequantized back from the written file and compared with "
                    "the source; a tensor with "
                    "NaN or infinities, or over its type's error bound, stops the run and "
                    "nothing is written.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf|OUT.safetensors")
    p.add_argument("--type", required=True, choices=[*TYPES, *SAFETENSORS_TYPES],
                   metavar="TYPE", help=f"{', '.join(TYPES)} (GGUF) or "
                                        f"{', '.join(SAFETENSORS_TYPES)} (safetensors)")
    p.add_argument("--fp8", choices=list(FP8_FORMATS),
                   help="the fp8 format of --type fp8-scaled (default e4m3fn)")
    add_output_options(p)
    add_fsync_option(p)
    add_hash_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    with progress_for(args, "quantize") as bar:
        report = quantize(args.model, args.output, args.type, fp8=args.fp8, progress=bar,
                          fsync=args.fsync, hash_sources=args.hash)
    if args.json:
        print(json_dumps(asdict(report)))
        return 0
    arch = f", architecture {report.architecture}" if report.type in TYPES else ""
    print(f"wrote {printable(args.output)}: {report.family}{arch}, "
          f"{counted(report.tensors, 'tensor')}, {human_count(report.parameters)} parameters "
          f"in {human_bytes(report.bytes)} ({report.bits_per_weight:.2f} bits per weight)")
    for name, summary in sorted(report.types.items(), key=lambda kv: -kv[1].parameters):
        checked = (f"relative RMS error mean {summary.mean_error:.2e}, max "
                   f"{summary.max_error:.2e} (bound {summary.bound:g})" if summary.worst
                   else "copied")
        print(f"  {name:<8} {counted(summary.tensors, 'tensor'):>13}  "
              f"{human_count(summary.parameters):>8} parameters  {checked}")
    if report.reshaped:
        print(f"note: {counted(report.reshaped, 'tensor')} reshaped to rows of 256, their "
              "shapes kept in comfy.gguf.orig_shape.*")
    if report.fallbacks:
        print(f"note: {counted(len(report.fallbacks), 'tensor')} kept in F16: their rows are "
              "not whole blocks of the type")
    for note in report.notes:
        print(f"note: {printable(note)}")
    return 0
