"""``ckpt generate MODEL... --prompt TEXT -o OUT.png``: an image from any checkpoint or mix of
parts, offline, with the settings the model was made for (``ops.generate``)."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError, counted
from ..ops.load import COMPUTE_DTYPES, MISSING_EXTRA
from ..safe_text import json_dumps, printable
from .progress import ProgressBar, add_fsync_option, add_output_options


def _epilog() -> str:
    from ..arch.families import families
    from ..ops.generate import PRESETS, SAMPLERS

    lines = ["presets (--preset; a file recognised as a distilled release gets its own "
             "without asking):"]
    for p in PRESETS.values():
        size = f", {p.size[0]}x{p.size[1]}" if p.size else ""
        sampler = f", {p.sampler.label}" if p.sampler else ""
        lines.append(f"  {p.name:<10} {counted(p.steps, 'step')}, guidance {p.guidance:g}"
                     f"{sampler}{size} "
                     f"({', '.join(p.families)}; {p.source})")
    lines += ["", f"samplers (SD 1.x, 2.x, XL; SD3 and FLUX use euler): {', '.join(SAMPLERS)}",
              "", "defaults: each family's model card ("
              + ", ".join(f"{f.name} {counted(f.sampling.steps, 'step')} at "
                          f"{f.sampling.guidance:g}" for f in families().values())
              + "); tokenizers are looked for in --tokenizers DIR, $CKPTKIT_TOKENIZERS, a ComfyUI "
              "install and the Hugging Face cache; nothing is downloaded"]
    return "\n".join(lines)


def add_parser(commands) -> None:
    from ..ops.generate import SLG

    p = commands.add_parser(
        "generate", help="make an image from a checkpoint (or its parts) and a prompt",
        description="Load MODEL (a checkpoint, or a diffusion model with its text encoders "
                    "and VAE, each file whatever its layout) into diffusers offline and make "
                    "one image. The PNG's 'parameters' text says how it was made, as "
                    "AUTOMATIC1111 writes it. Needs: pip install 'ckptkit[generate]'.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="a checkpoint, or parts (each is taken as what its header says)")
    p.add_argument("--prompt", required=True)
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="CFG scale (FLUX.1 dev: distilled "
                                                  "guidance)")
    p.add_argument("--seed", type=int, help="default: a random one, printed")
    p.add_argument("--size", metavar="WxH", help="default: the model's own")
    p.add_argument("--sampler", metavar="NAME", help="see below")
    p.add_argument("--preset", metavar="NAME", help="turbo, schnell, lightning or lcm")
    p.add_argument("--diffusion-model", metavar="FILE")
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="may be given once per text encoder")
    p.add_argument("--vae", metavar="FILE")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH[:TE]]",
                   help="a LoRA applied as the weights load, with ckpt lora bake's code "
                        "(repeatable, in order; TE: the text encoders' strength)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="load the LoRA modules that land somewhere and leave out the others "
                        "(by default, any that lands nowhere refuses)")
    p.add_argument("--image", metavar="FILE",
                   help="the input image of a model that starts from one (the SDXL refiner, "
                        "inpainting, InstructPix2Pix, FLUX.1 Fill; FLUX.1 Depth/Canny: the "
                        "depth or edge map); the output takes its size")
    p.add_argument("--mask", metavar="FILE", help="inpainting and FLUX.1 Fill: the area to "
                                                   "repaint (white), the image's size")
    p.add_argument("--strength", type=float, help="how much of the image is redone, 0-1 "
                                                  "(default: the pipeline's own)")
    p.add_argument("--image-guidance", type=float, metavar="G",
                   help="InstructPix2Pix: how closely to keep the image (default 1.5)")
    p.add_argument("--slg", nargs="?", type=float, const=SLG.scale, metavar="SCALE",
                   help=(f"SD3.5 Medium: skip-layer guidance on layers "
                         f"{', '.join(map(str, SLG.layers))} from {SLG.start:.0%} to "
                         f"{SLG.stop:.0%} of the steps, scale {SLG.scale:g} unless given "
                         f"({SLG.source}; off by default, as there)").replace("%", "%%"))
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=list(COMPUTE_DTYPES),
                   help="default: fp32 on the CPU, the model's own on a GPU")
    p.add_argument("--tokenizers", metavar="DIR", help="a folder of tokenizer folders")
    add_output_options(p)
    add_fsync_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    # transformers and diffusers warn about what ckptkit does not use (torchvision for
    # image processors, safety checkers): only their errors are the user's business here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from ..lora.bake import parse_spec
        from ..ops.generate import generate, parse_size
    except ImportError:
        raise UsageError(MISSING_EXTRA) from None
    if not args.models and not args.diffusion_model:
        raise UsageError("generate needs a MODEL (or --diffusion-model and its parts)")
    bar = ProgressBar("generate", unit="steps", counts_only=True,
                      enabled=False if args.quiet or args.json else None)

    def on_step(done: int, total: int) -> None:
        if done == 1:
            bar.start(total, total)
        bar.update(1, 1)

    with bar:
        report = generate(
            args.models, args.prompt, args.output, negative=args.negative, steps=args.steps,
            guidance=args.guidance, seed=args.seed,
            size=parse_size(args.size) if args.size else None, sampler=args.sampler,
            diffusion_model=args.diffusion_model, text_encoders=args.text_encoder,
            vae=args.vae, device=args.device, dtype=args.dtype, preset=args.preset,
            tokenizers=args.tokenizers, on_step=on_step, fsync=args.fsync,
            loras=[parse_spec(text) for text in args.lora],
            allow_unmatched=args.allow_unmatched, image=args.image, mask=args.mask,
            strength=args.strength, image_guidance=args.image_guidance, slg=args.slg)
    if args.json:
        print(json_dumps(report))
        return 0
    chosen = report["settings"]
    print(f"wrote {printable(args.output)}: {report['family']}, {chosen['steps']} steps, "
          f"{chosen['sampler']}, guidance {chosen['guidance']:g}, seed {chosen['seed']}, "
          f"{chosen['width']}x{chosen['height']} (settings: "
          f"{printable('; '.join(chosen['sources']))})")
    for warning in report["warnings"]:
        print(f"note: {printable(warning)}")
    return 0
