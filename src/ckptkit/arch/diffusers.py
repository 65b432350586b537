"""Recognises components saved in the diffusers layout (``unet/``, ``transformer/``, ``vae/``).

diffusers renames every block (``down_blocks.1.attentions.0`` for ``input_blocks.4.1``), so
its files are told apart by signature keys and the shapes the diffusers configs set:
cross-attention width (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner), the added-conditioning
input of SDXL, transformer depth and the SD3.5 / FLUX dev markers. Text encoders are saved
under the transformers names, which are the canonical names ``arch.detect`` already knows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .keys import Shape

_CROSS_ATTENTION = re.compile(r"(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0"
                              r"\.attn2\.to_k\.weight$")


def diffusers_component(shapes: Mapping[str, Shape]) -> tuple[str, str | None, list[str]] | None:
    """(component, family or None, reasons) for a diffusers-layout file, or None."""
    keys = set(shapes)
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys) \
            and "time_embedding.linear_1.weight" in keys:
        return _unet(shapes)
    if "pos_embed.proj.weight" in keys and "context_embedder.weight" in keys:
        return _sd3(shapes)
    if "x_embedder.weight" in keys and any(k.startswith("single_transformer_blocks.")
                                           for k in keys):
        guidance = any(k.startswith("time_text_embed.guidance_embedder") for k in keys)
        family = "flux1-dev" if guidance else "flux1-schnell"
        return ("diffusion_model", family,
                ["diffusers FLUX transformer (x_embedder, single_transformer_blocks)",
                 "guidance embedder present: dev" if guidance else
                 "no guidance embedder: schnell"])
    if "decoder.conv_in.weight" in keys and any(k.startswith("decoder.up_blocks.")
                                                for k in keys):
        latent = shapes["decoder.conv_in.weight"][1]
        return ("vae", None, [f"diffusers AutoencoderKL with {latent} latent channels "
                              f"({'SD1/SD2/SDXL' if latent == 4 else 'SD3/FLUX'})"])
    return None


def _unet(shapes: Mapping[str, Shape]) -> tuple[str, str | None, list[str]]:
    reasons = ["diffusers UNet2DConditionModel keys (conv_in, down_blocks, time_embedding)"]
    context = next((shapes[k][1] for k in shapes if _CROSS_ATTENTION.search(k)), None)
    added = shapes.get("add_embedding.linear_1.weight")
    proj_in = next((shapes[k] for k in shapes if k.endswith("attentions.0.proj_in.weight")),
                   None)
    family = None
    if added is not None:
        family = "sdxl" if context == 2048 else "sdxl-refiner" if context == 1280 else None
        reasons.append(f"added conditioning of width {added[1]} and cross-attention width "
                       f"{context}: {family or 'an SDXL-like model of unknown kind'}")
    elif context == 768 and proj_in is not None and len(proj_in) == 4:
        family = "sd1"
        reasons.append("cross-attention width 768 and convolutional proj_in: SD1")
    elif context == 1024:
        family = "sd2"
        reasons.append("cross-attention width 1024: SD2")
    else:
        reasons.append(f"cross-attention width {context} fits no known family")
    in_channels = shapes["conv_in.weight"][1]
    if in_channels != 4:
        reasons.append(f"conv_in takes {in_channels} input channels")
    return "diffusion_model", family, reasons


def _sd3(shapes: Mapping[str, Shape]) -> tuple[str, str | None, list[str]]:
    depth = len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")})
    qk_norm = any(".attn.norm_q." in k for k in shapes)
    dual = any(".attn2." in k for k in shapes)
    if depth == 38:
        family = "sd3.5-large"
    elif depth == 24 and dual:
        family = "sd3.5-medium"
    elif depth == 24 and not qk_norm:
        family = "sd3-medium"
    else:
        family = None
    return ("diffusion_model", family,
            [f"diffusers SD3Transformer2DModel with {depth} blocks"
             f"{', qk norm' if qk_norm else ''}{', second attention (MMDiT-X)' if dual else ''}"
             f": {family or 'no known SD3 variant'}"])
