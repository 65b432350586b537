"""The diffusers layout of every family: which maps convert each component, with which config,
and how a pipeline folder is laid out (``model_index.json``, subfolders, scheduler).

Why one dispatcher: the key maps are per network (``diffusers_unet``, ``diffusers_vae``,
``diffusers_text``; the SD3/FLUX transformers and T5 in ``diffusers_dit``), but what a folder
holds is per family: the pipeline class, which text encoder goes in ``text_encoder_2``, the
scheduler, the VAE's latent scaling, the image size. Those facts are here, as data, as the
official repositories ship them (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-
2-1-base, stable-diffusion-xl-base-1.0 and -refiner-1.0, stable-diffusion-3-medium-diffusers,
stable-diffusion-3.5-medium/-large, black-forest-labs/FLUX.1-dev and -schnell). Tokenizers are
not weights: the folder names them ``[null, null]`` and a loader is given them apart.

kohya sd-scripts saves SD 1.x checkpoints with these diffusers names under ``te.``, ``unet.``
and ``vae.`` (sd-mecha's sd1-kohya table), so that layout is built here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import diffusers_dit, diffusers_text, diffusers_unet, diffusers_vae
from .families import DIFFUSION_MODEL, VAE, Family
from .keys import KeyTable
from .keys import clip as clip_keys
from .keys.unet import UNetConfig
from .layouts import Move

_SD_BETAS = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
_PNDM = {"_class_name": "PNDMScheduler", **_SD_BETAS}
_EULER = {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS, "interpolation_type": "linear",
          "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False}
_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
_SD3_FLOW = {**_FLOW, "shift": 3.0}
_FLUX_FLOW = {**_FLOW, "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
              "max_shift": 1.15}
_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


@dataclass(frozen=True)
class _Pipeline:
    cls: str
    parts: tuple[tuple[str, str], ...]  # (subfolder, component)
    scheduler: dict
    scaling: tuple[float, float | None]  # the VAE latent's scaling and shift factors
    extras: dict  # model_index entries besides the parts and the scheduler


_NO_TOKENIZERS = {"tokenizer": [None, None]}
_SD = dict(_NO_TOKENIZERS, feature_extractor=[None, None], safety_checker=[None, None],
           requires_safety_checker=False)
_SDXL_PARTS = (("unet", DIFFUSION_MODEL), ("text_encoder", "clip_l"),
               ("text_encoder_2", "clip_g"), ("vae", VAE))
_SD3 = _Pipeline("StableDiffusion3Pipeline",
                 (("transformer", DIFFUSION_MODEL), ("text_encoder", "clip_l"),
                  ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl"), ("vae", VAE)),
                 _SD3_FLOW, (1.5305, 0.0609),
                 dict(_NO_TOKENIZERS, tokenizer_2=[None, None], tokenizer_3=[None, None]))
_FLUX_PARTS = (("transformer", DIFFUSION_MODEL), ("text_encoder", "clip_l"),
               ("text_encoder_2", "t5xxl"), ("vae", VAE))
_FLUX_EXTRAS = dict(_NO_TOKENIZERS, tokenizer_2=[None, None])

_PIPELINES = {
    "sd1": _Pipeline("StableDiffusionPipeline",
                     (("unet", DIFFUSION_MODEL), ("text_encoder", "clip_l"), ("vae", VAE)),
                     _PNDM, (0.18215, None), _SD),
    "sd2": _Pipeline("StableDiffusionPipeline",
                     (("unet", DIFFUSION_MODEL), ("text_encoder", "openclip_h"), ("vae", VAE)),
                     _PNDM, (0.18215, None), _SD),
    "sdxl": _Pipeline("StableDiffusionXLPipeline", _SDXL_PARTS, _EULER, (0.13025, None),
                      dict(_NO_TOKENIZERS, tokenizer_2=[None, None],
                           force_zeros_for_empty_prompt=True)),
    "sdxl-refiner": _Pipeline("StableDiffusionXLImg2ImgPipeline",
                              (("unet", DIFFUSION_MODEL), ("text_encoder_2", "clip_g"),
                               ("vae", VAE)),
                              _EULER, (0.13025, None),
                              dict(_NO_TOKENIZERS, tokenizer_2=[None, None],
                                   text_encoder=[None, None], requires_aesthetics_score=True,
                                   force_zeros_for_empty_prompt=False)),
    "sd3-medium": _SD3,
    "sd3.5-medium": _SD3,
    "sd3.5-large": _SD3,
    "flux1-dev": _Pipeline("FluxPipeline", _FLUX_PARTS,
                           {**_FLUX_FLOW, "shift": 3.0, "use_dynamic_shifting": True},
                           (0.3611, 0.1159), _FLUX_EXTRAS),
    "flux1-schnell": _Pipeline("FluxPipeline", _FLUX_PARTS,
                               {**_FLUX_FLOW, "shift": 1.0, "use_dynamic_shifting": False},
                               (0.3611, 0.1159), _FLUX_EXTRAS),
}

# SD 2.x conditions on the penultimate layer of OpenCLIP-H and has no use for its projection:
# diffusers' SD2 text_encoder is that encoder cut there (23 layers, a plain CLIPTextModel), as
# its single-file loader cuts it. The last layer and the projection are left out.
_PENULTIMATE = {("sd2", "openclip_h")}
# kohya sd-scripts' SD 1.x checkpoints: diffusers names under these prefixes, and no
# position_ids (sd-mecha's sd1-kohya table). Its SDXL files keep the original names
# (``Component.kohya_prefix`` in arch.families).
_KOHYA = {"sd1": {"clip_l": "te.", DIFFUSION_MODEL: "unet.", VAE: "vae."}}


def _pipeline(fam: Family) -> _Pipeline:
    found = _PIPELINES.get(fam.id)
    if found is None:
        raise KeyError(f"ckptkit has no diffusers layout for {fam.id}")
    return found


def _config(fam: Family, name: str, tiny: bool):
    comp = fam.component(name)
    config = comp.tiny if tiny else comp.full
    if (fam.id, name) in _PENULTIMATE:
        config = dataclasses.replace(config, layers=config.layers - 1, projection_dim=None)
    return config


def _maps(fam: Family, name: str, tiny: bool):
    """(module with to_diffusers/from_diffusers, config) for one component."""
    config = _config(fam, name, tiny)
    if name == VAE:
        return diffusers_vae, config
    if name == DIFFUSION_MODEL:
        return (diffusers_unet if isinstance(config, UNetConfig) else diffusers_dit), config
    if name == "t5xxl":
        return diffusers_dit, config
    return diffusers_text, config


def to_diffusers(fam: Family, name: str, tiny: bool, present: set[str]) -> list[Move]:
    """Moves from component ``name``'s canonical keys in ``present`` to its diffusers names.
    Keys the diffusers model has no place for (SD2's last text encoder layer) are left out."""
    module, config = _maps(fam, name, tiny)
    if (fam.id, name) in _PENULTIMATE:
        kept = set(clip_keys.clip_keys(config))
        full = fam.component(name).keys(tiny=tiny)
        diffusers_unet.refuse_unknown(present - kept, set(full), "CLIP text encoder")
        present = present & kept
    return module.to_diffusers(config, present)


def from_diffusers(fam: Family, name: str, tiny: bool, present: set[str]) -> list[Move]:
    """Moves from component ``name``'s diffusers keys in ``present`` to its canonical names."""
    module, config = _maps(fam, name, tiny)
    return module.from_diffusers(config, present)


def component_config(fam: Family, name: str, tiny: bool) -> dict:
    """The ``config.json`` of component ``name`` in ``fam``'s diffusers folder."""
    module, config = _maps(fam, name, tiny)
    side = fam.sampling.resolution[0]
    if module is diffusers_unet:
        return diffusers_unet.diffusers_config(config, sample_size=side // 8)
    if module is diffusers_vae:
        scaling, shift = _pipeline(fam).scaling
        return diffusers_vae.diffusers_config(config, sample_size=side, scaling_factor=scaling,
                                              shift_factor=shift)
    if module is diffusers_text:
        return diffusers_text.diffusers_config(config, name)
    return module.diffusers_config(config)


def weights_file(config: dict) -> str:
    """The weights file name a component's loader looks for, from its config."""
    return "diffusion_pytorch_model.safetensors" if "_class_name" in config \
        else "model.safetensors"


def _index_entry(config: dict) -> list[str]:
    if "_class_name" in config:
        return ["diffusers", config["_class_name"]]
    return ["transformers", config["architectures"][0]]


# The pipeline class of an input-channel variant, where diffusers has one (the class the
# released folders name: runwayml's inpainting, timbrooks/instruct-pix2pix, FLUX.1 Fill-dev
# and Depth-dev).
VARIANT_PIPELINES = {
    ("StableDiffusionPipeline", "inpaint"): "StableDiffusionInpaintPipeline",
    ("StableDiffusionPipeline", "pix2pix"): "StableDiffusionInstructPix2PixPipeline",
    ("StableDiffusionXLPipeline", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("StableDiffusionXLPipeline", "pix2pix"): "StableDiffusionXLInstructPix2PixPipeline",
    ("FluxPipeline", "fill"): "FluxFillPipeline",
    ("FluxPipeline", "depth"): "FluxControlPipeline",
}


def pipeline_class(fam: Family, variants: Iterable[str] = ()) -> str:
    """The diffusers pipeline class of ``fam``, or of its input-channel variant."""
    cls = _pipeline(fam).cls
    for variant in variants:
        cls = VARIANT_PIPELINES.get((cls, variant), cls)
    return cls


def folder(fam: Family, variant: str | None = None) -> tuple[dict, dict[str, tuple[str, str]]]:
    """``fam``'s ``model_index.json`` (of its ``variant``'s pipeline) and its weights:
    subfolder -> (component, file name)."""
    pipe = _pipeline(fam)
    index: dict = {"_class_name": pipeline_class(fam, [variant] if variant else []),
                   **pipe.extras,
                   "scheduler": ["diffusers", pipe.scheduler["_class_name"]]}
    parts = {}
    for sub, name in pipe.parts:
        config = component_config(fam, name, tiny=False)
        index[sub] = _index_entry(config)
        parts[sub] = (name, weights_file(config))
    return dict(sorted(index.items())), parts


def scheduler_config(fam: Family) -> dict:
    """``scheduler/scheduler_config.json``: the official scheduler with the family's
    prediction type where the scheduler has one."""
    config = dict(_pipeline(fam).scheduler)
    if config["_class_name"] != _FLOW["_class_name"]:
        config["prediction_type"] = _PREDICTION[fam.sampling.prediction]
    return config


def kohya_renames(fam: Family) -> bool:
    """Whether kohya's layout of ``fam`` uses diffusers names (SD 1.x) rather than prefixes."""
    return fam.id in _KOHYA


def kohya_prefix(fam: Family, name: str) -> str:
    """The prefix of ``name`` in kohya's diffusers-named layout of ``fam`` ("" if none)."""
    return _KOHYA.get(fam.id, {}).get(name, "")


def kohya_moves(fam: Family, name: str, tiny: bool, present: set[str]) -> list[Move] | None:
    """Moves from canonical keys to kohya's diffusers-named layout of ``fam`` (SD 1.x), or
    None when kohya does not name ``fam``'s components that way."""
    prefix = kohya_prefix(fam, name)
    if not prefix:
        return None
    return [dataclasses.replace(m, target=prefix + m.target)
            for m in to_diffusers(fam, name, tiny, present)
            if not m.target.endswith("position_ids")]


def kohya_table(fam: Family, name: str, tiny: bool) -> KeyTable:
    """Keys and shapes of ``name`` in kohya's diffusers-named layout of ``fam`` ({} if none)."""
    if not kohya_prefix(fam, name):
        return {}
    canonical = fam.component(name).keys(tiny=tiny)
    moves = kohya_moves(fam, name, tiny, set(canonical))
    return moved_table(moves, canonical) if moves is not None else {}


def layout_table(fam: Family, name: str, tiny: bool, layout: str) -> KeyTable:
    """Keys and shapes of component ``name`` of ``fam`` in ``layout``: the registry's own
    layouts, kohya's diffusers-named SD 1.x files, or a diffusers component file."""
    comp = fam.component(name)
    if layout == "diffusers":
        canonical = comp.keys(tiny=tiny)
        return moved_table(to_diffusers(fam, name, tiny, set(canonical)), canonical)
    return comp.keys(tiny=tiny, layout=layout) or (
        kohya_table(fam, name, tiny) if layout == "kohya" else {})


def moved_table(moves: Sequence[Move], table: KeyTable) -> KeyTable:
    """Keys and shapes that ``moves`` make from a component of keys and shapes ``table``."""
    out: KeyTable = {}
    for move in moves:
        first = table[move.sources[0]] if move.sources else ()
        if move.op == "rows":
            start, stop = move.row_range(first[0])
            shape = (stop - start, *first[1:])
        elif move.op == "reshape":
            shape = move.shape
        elif move.op == "concat":
            shape = (sum(table[s][0] for s in move.sources), *first[1:])
        elif move.op == "transpose":
            shape = tuple(reversed(first))
        else:  # copy, swap_halves; a scalar has no source and shape ()
            shape = first
        out[move.target] = shape
    return out
