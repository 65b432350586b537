"""The model families ckptkit knows, each declared once: components, prefixes, sampling.

A family lists its components (the diffusion model, the text encoders, the VAE) with the key
generator and config of each (full size and tiny), and where each component sits in the
family's original monolithic checkpoint (its prefix, and whether its text encoder is stored
in the open_clip naming there). Detection, sample generation, splitting and assembling all
read these declarations; nothing else in ckptkit spells a family's key names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache

from .keys import KeyTable
from .keys import clip as clip_keys
from .keys import flux as flux_keys
from .keys import mmdit as mmdit_keys
from .keys import t5 as t5_keys
from .keys import unet as unet_keys
from .keys import vae as vae_keys

DIFFUSION_MODEL = "diffusion_model"
TEXT_ENCODERS = ("clip_l", "clip_g", "openclip_h", "t5xxl")
VAE = "vae"
_PROJECTION = (".text_projection", ".text_projection.weight")

# Which kind of file each component is when it stands alone.
COMPONENT_KINDS = {DIFFUSION_MODEL: "diffusion-model", VAE: "vae",
                   **{name: "text-encoder" for name in TEXT_ENCODERS}}


@dataclass(frozen=True)
class Component:
    """One part of a family's model and how its keys are generated and prefixed.

    ``build(config)`` returns the canonical (ComfyUI standalone) keys; ``ldm_build`` the keys
    as the monolithic checkpoint stores them under ``ldm_prefix`` when they are named
    differently there (the open_clip text encoders of SD2 and SDXL), else ``None``.
    """

    name: str
    full: object
    tiny: object
    build: Callable[[object], KeyTable]
    ldm_prefix: str
    ldm_build: Callable[[object], KeyTable] | None = None
    kohya_prefix: str | None = None  # kohya sd-scripts' checkpoint prefix, canonical names
    # How the monolithic file names it: "canonical" (prefix only), "openclip" (SD2/SDXL text
    # encoders), "transformer" (SD3/FLUX all-in-one: under transformer. with a logit_scale).
    ldm_naming: str = "canonical"
    # Parts of the network this family never reads, which files of it may therefore lack
    # (``optional``): name fragments, in every naming (``encoder.layers.11.``, open_clip's
    # ``resblocks.11.``, ``final_layer_norm.``, ``text_projection``).
    unused: tuple[str, ...] = ()

    def optional(self, key: str) -> bool:
        """Whether files of this component may hold ``key`` or not, in any layout: CLIP's
        ``position_ids`` (a buffer transformers stopped saving), ``logit_scale`` (open_clip's
        and ComfyUI's, unused by diffusion), CLIP-L's ``text_projection`` (many CLIP-L files
        lack it: ComfyUI loads them without it, Comfy-Org/ComfyUI#5222, and diffusers puts an
        identity in for SD3), and the parts the family never reads (``unused``)."""
        dotted = "." + key
        if dotted.endswith((".position_ids", ".logit_scale")):
            return True
        if self.name == "clip_l" and dotted.endswith(_PROJECTION):
            return True
        return any(dotted.endswith(_PROJECTION) if part == "text_projection" else
                   "." + part in dotted for part in self.unused)

    def prefix(self, layout: str) -> str:
        return {"ldm": self.ldm_prefix, "kohya": self.kohya_prefix or ""}.get(layout, "")

    def keys(self, tiny: bool = False, layout: str = "comfyui") -> KeyTable:
        """This component's keys in ``layout``: "comfyui" bare canonical names; "ldm" the
        monolithic prefix and naming; "kohya" kohya's prefix (empty when it has none)."""
        config = self.tiny if tiny else self.full
        if layout == "comfyui":
            return self.build(config)
        if layout == "kohya":
            if self.kohya_prefix is None:
                return {}
            return {self.kohya_prefix + k: v for k, v in self.build(config).items()}
        table = (self.ldm_build or self.build)(config)
        return {self.ldm_prefix + k: v for k, v in table.items()}


@dataclass(frozen=True)
class Sampling:
    """What a user needs to get a sensible image: the published defaults of the model."""

    resolution: tuple[int, int]
    steps: int
    guidance: float
    prediction: str  # "epsilon", "v" or "flow"
    scheduler: str
    shift: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Family:
    id: str
    name: str
    components: tuple[Component, ...]
    sampling: Sampling
    latent_channels: int
    # modelspec.architecture values (and kohya ss_base_model_version values) naming it.
    architectures: tuple[str, ...] = ()
    # Distilled or otherwise retrained releases with the same weights layout.
    distilled: dict[str, Sampling] = field(default_factory=dict)

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(f"{self.id} has no component {name}")

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)


def _unet(full, tiny) -> Component:
    return Component(DIFFUSION_MODEL, full, tiny, unet_keys.unet_keys, "model.diffusion_model.")


def _vae(full, tiny, prefix: str = "first_stage_model.") -> Component:
    return Component(VAE, full, tiny, vae_keys.vae_keys, prefix)


def _clip(name: str, full, tiny, prefix: str, openclip: bool = False,
          unused: tuple[str, ...] = ()) -> Component:
    if openclip:
        return Component(name, full, tiny, clip_keys.clip_keys, prefix, clip_keys.openclip_keys,
                         ldm_naming="openclip", unused=unused)
    return Component(name, full, tiny, clip_keys.clip_keys, prefix, unused=unused)


def _unread(config, final_norm: bool) -> tuple[str, ...]:
    """What a family that reads a CLIP's penultimate hidden states and not its pooled output
    never uses: the last layer and the projection, and the final norm unless the family
    normalizes the penultimate states with it (SD2 does, as ldm's FrozenOpenCLIPEmbedder
    applies ln_final; SDXL's CLIP-L does not: sgm's layer="hidden" output, ComfyUI's
    layer_norm_hidden_state=False, diffusers' hidden_states[-2])."""
    last = config.layers - 1
    norm = () if final_norm else ("final_layer_norm.", "ln_final.")
    return (f"encoder.layers.{last}.", f"resblocks.{last}.", "text_projection", *norm)


def _t5(prefix: str) -> Component:
    return Component("t5xxl", t5_keys.T5_XXL, t5_keys.T5_XXL_TINY, t5_keys.t5_keys, prefix)


def _kohya(comp: Component, prefix: str) -> Component:
    return replace(comp, kohya_prefix=prefix)


def _in_text_encoders(comp: Component) -> Component:
    """ComfyUI's all-in-one SD3/FLUX files: ``text_encoders.<name>.transformer.<keys>`` plus
    a ``text_encoders.<name>.logit_scale`` scalar that only these files carry (seen in
    sd-mecha's sd3-comfyui table and in Comfy-Org's flux1-dev-fp8 header)."""
    build = comp.build

    def ldm_build(config) -> KeyTable:
        return {"logit_scale": (), **{"transformer." + k: v for k, v in build(config).items()}}

    return replace(comp, ldm_prefix=f"text_encoders.{comp.name}.", ldm_build=ldm_build,
                   ldm_naming="transformer")


def _mmdit(full, tiny) -> Component:
    return Component(DIFFUSION_MODEL, full, tiny, mmdit_keys.mmdit_keys, "model.diffusion_model.")


def _flux(full, tiny) -> Component:
    return Component(DIFFUSION_MODEL, full, tiny, flux_keys.flux_keys, "model.diffusion_model.")


def _sd3_family(fid: str, name: str, full, tiny, sampling: Sampling,
                architectures: tuple[str, ...], distilled=None) -> Family:
    return Family(
        fid, name,
        (_mmdit(full, tiny),
         _in_text_encoders(_clip("clip_l", clip_keys.CLIP_L_SD3, clip_keys.CLIP_L_SD3_TINY, "")),
         _in_text_encoders(_clip("clip_g", clip_keys.CLIP_G, clip_keys.CLIP_G_TINY, "")),
         _in_text_encoders(_t5("")),
         _vae(vae_keys.VAE_16, vae_keys.VAE_16_TINY)),
        sampling, 16, architectures, distilled or {})


def _flux_family(fid: str, name: str, full, tiny, sampling: Sampling,
                 architectures: tuple[str, ...]) -> Family:
    return Family(
        fid, name,
        (_flux(full, tiny),
         _in_text_encoders(_clip("clip_l", clip_keys.CLIP_L_FLUX, clip_keys.CLIP_L_FLUX_TINY,
                                 "")),
         _in_text_encoders(_t5("")),
         _vae(vae_keys.VAE_16, vae_keys.VAE_16_TINY, "vae.")),
        sampling, 16, architectures)


# Sampling defaults are each release's own published settings (checked 2026-12-03):
# - SD 1.x, 2.x, SDXL base: their model cards call the diffusers pipeline with its defaults
#   (StableDiffusionPipeline 50 steps at 7.5, StableDiffusionXLPipeline 50 at 5.0).
# - SD3 Medium: stabilityai/stable-diffusion-3-medium card and diffusers' SD3 docs, 28 steps
#   at 7.0. SD3.5 Medium: its card, 40 at 4.5 (Stability's sd3_infer.py runs 50 at 5.0 with
#   skip-layer guidance). SD3.5 Large: its card, 28 at 3.5 (sd3_infer.py: 40 at 4.5 with
#   dpmpp_2m). Shift 3.0: every SD3.x scheduler_config.json.
# - FLUX.1 dev: black-forest-labs/FLUX.1-dev card, 50 steps at guidance 3.5 (BFL's own CLI
#   also defaults to 50); schnell: its card, 4 steps at 0.


@cache
def families() -> dict[str, Family]:
    """Every family by id, in the order detection reports alternatives."""
    fams = [
        Family("sd1", "Stable Diffusion 1.x",
               (_unet(unet_keys.SD1_UNET, unet_keys.SD1_UNET_TINY),
                _clip("clip_l", clip_keys.CLIP_L_SD1, clip_keys.CLIP_L_SD1_TINY,
                      "cond_stage_model.transformer."),
                _vae(vae_keys.VAE_SD, vae_keys.VAE_SD_TINY)),
               Sampling((512, 512), 50, 7.5, "epsilon", "DDIM / Euler"), 4,
               ("stable-diffusion-v1", "stable-diffusion-v1-inpainting", "sd_v1")),
        Family("sd2", "Stable Diffusion 2.x",
               (_unet(unet_keys.SD2_UNET, unet_keys.SD2_UNET_TINY),
                _clip("openclip_h", clip_keys.OPENCLIP_H, clip_keys.OPENCLIP_H_TINY,
                      "cond_stage_model.model.", openclip=True,
                      unused=_unread(clip_keys.OPENCLIP_H, final_norm=True)),
                _vae(vae_keys.VAE_SD, vae_keys.VAE_SD_TINY)),
               Sampling((512, 512), 50, 7.5, "epsilon", "DDIM / Euler",
                        note="the 768 models (2.0-v, 2.1) predict v at 768x768"), 4,
               ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
                "stable-diffusion-v2-inpainting", "stable-diffusion-v2-depth", "sd_v2",
                "sd_v2_v")),
        # kohya sd-scripts saves SDXL with te1./te2./unet. prefixes and canonical names
        # (sd-mecha's sdxl-kohya table); its SD1 files use diffusers names instead.
        Family("sdxl", "Stable Diffusion XL base",
               (_kohya(_unet(unet_keys.SDXL_UNET, unet_keys.SDXL_UNET_TINY), "unet."),
                # CLIP-G's pooled output conditions SDXL (through its last layer, ln_final
                # and text_projection): all of it is read. CLIP-L's pooled output is not.
                _kohya(_clip("clip_l", clip_keys.CLIP_L_SDXL, clip_keys.CLIP_L_SDXL_TINY,
                             "conditioner.embedders.0.transformer.",
                             unused=_unread(clip_keys.CLIP_L_SDXL, final_norm=False)), "te1."),
                _kohya(_clip("clip_g", clip_keys.CLIP_G, clip_keys.CLIP_G_TINY,
                             "conditioner.embedders.1.model.", openclip=True), "te2."),
                _kohya(_vae(vae_keys.VAE_SD, vae_keys.VAE_SD_TINY), "first_stage_model.")),
               Sampling((1024, 1024), 50, 5.0, "epsilon", "Euler"), 4,
               ("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-edit",
                "stable-diffusion-xl-turbo-v1", "sdxl_base_v1-0"),
               {"turbo": Sampling((512, 512), 1, 0.0, "epsilon", "Euler (trailing timesteps)",
                                  note="SDXL Turbo: 1-4 steps, guidance off")}),
        Family("sdxl-refiner", "Stable Diffusion XL refiner",
               (_unet(unet_keys.SDXL_REFINER_UNET, unet_keys.SDXL_REFINER_UNET_TINY),
                _clip("clip_g", clip_keys.CLIP_G, clip_keys.CLIP_G_TINY,
                      "conditioner.embedders.0.model.", openclip=True),
                _vae(vae_keys.VAE_SD, vae_keys.VAE_SD_TINY)),
               Sampling((1024, 1024), 50, 5.0, "epsilon", "Euler",
                        note="refines the last steps of a base image (img2img)"), 4,
               ("stable-diffusion-xl-v1-refiner",)),
        _sd3_family("sd3-medium", "Stable Diffusion 3 Medium",
                    mmdit_keys.SD3_MEDIUM, mmdit_keys.SD3_MEDIUM_TINY,
                    Sampling((1024, 1024), 28, 7.0, "flow", "FlowMatch Euler", 3.0),
                    ("stable-diffusion-v3-medium", "stable-diffusion-3-medium")),
        _sd3_family("sd3.5-medium", "Stable Diffusion 3.5 Medium",
                    mmdit_keys.SD35_MEDIUM, mmdit_keys.SD35_MEDIUM_TINY,
                    Sampling((1024, 1024), 40, 4.5, "flow", "FlowMatch Euler", 3.0,
                             note="skip-layer guidance on layers 7-9"),
                    ("stable-diffusion-v3-5-medium", "stable-diffusion-3-5-medium")),
        _sd3_family("sd3.5-large", "Stable Diffusion 3.5 Large",
                    mmdit_keys.SD35_LARGE, mmdit_keys.SD35_LARGE_TINY,
                    Sampling((1024, 1024), 28, 3.5, "flow", "FlowMatch Euler", 3.0),
                    ("stable-diffusion-v3-5-large", "stable-diffusion-3-5-large"),
                    {"turbo": Sampling((1024, 1024), 4, 1.0, "flow", "FlowMatch Euler", 3.0,
                                       note="SD3.5 Large Turbo: 4 steps, guidance off")}),
        _flux_family("flux1-dev", "FLUX.1 [dev]", flux_keys.FLUX_DEV, flux_keys.FLUX_DEV_TINY,
                     Sampling((1024, 1024), 50, 3.5, "flow", "FlowMatch Euler", 1.15,
                              note="guidance is distilled (a model input), not CFG"),
                     ("flux-1-dev", "flux1")),
        _flux_family("flux1-schnell", "FLUX.1 [schnell]", flux_keys.FLUX_SCHNELL,
                     flux_keys.FLUX_SCHNELL_TINY,
                     Sampling((1024, 1024), 4, 0.0, "flow", "FlowMatch Euler", 1.0,
                              note="timestep-distilled: 1-4 steps, no guidance"),
                     ("flux-1-schnell",)),
    ]
    return {f.id: f for f in fams}


def family(fid: str) -> Family:
    """The family named ``fid``: its id or a name users call it by (see ``family_id``)."""
    found = families().get(family_id(fid))
    if found is None:
        raise KeyError(f"unknown family {fid!r}; known: {', '.join(families())} "
                       "(or a usual name: sd15, sdxl-base, flux-dev, ...)")
    return found


# The names users type for families and components (as ComfyUI's folders, AUTOMATIC1111,
# kohya and model pages spell them), compared with case, dots, dashes, underscores and spaces
# left out. A family's ModelSpec architectures name it too. A name that could mean two
# families or components ("flux", "sd3.5", "clip") is none of them: the error lists the choices.
_FAMILY_ALIASES = {
    "sd15": "sd1", "sd14": "sd1", "sd1x": "sd1", "sdv1": "sd1", "sdv15": "sd1",
    "sd20": "sd2", "sd21": "sd2", "sd2x": "sd2", "sdv2": "sd2",
    "sdxlbase": "sdxl", "sdxl1": "sdxl", "sdxl10": "sdxl", "sdxlbase10": "sdxl",
    "sdxl10base": "sdxl", "sdxlrefiner10": "sdxl-refiner", "refiner": "sdxl-refiner",
    "sd3": "sd3-medium", "sd3m": "sd3-medium", "sd35m": "sd3.5-medium", "sd35l": "sd3.5-large",
    "fluxdev": "flux1-dev", "flux1d": "flux1-dev",
    "fluxschnell": "flux1-schnell", "flux1s": "flux1-schnell", "schnell": "flux1-schnell",
}
_COMPONENT_ALIASES = {
    "diffusionmodel": DIFFUSION_MODEL, "diffusionmodels": DIFFUSION_MODEL,
    "unet": DIFFUSION_MODEL, "transformer": DIFFUSION_MODEL, "dit": DIFFUSION_MODEL,
    "mmdit": DIFFUSION_MODEL, "clipl": "clip_l", "clipg": "clip_g", "opencliph": "openclip_h",
    "cliph": "openclip_h", "t5": "t5xxl", "t5xxl": "t5xxl", "vae": VAE, "ae": VAE,
}


def _squashed(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " ._-")


def family_id(name: str) -> str:
    """The family id that ``name`` stands for (``sd15`` -> ``sd1``, ``flux-dev`` ->
    ``flux1-dev``); ``name`` itself when it names none, for the caller's error to quote."""
    known = {_squashed(f.id): f.id for f in families().values()}
    for f in families().values():
        known.update({_squashed(a): f.id for a in f.architectures})
    known.update(_FAMILY_ALIASES)
    return known.get(_squashed(name), name)


def component_name(name: str) -> str:
    """The component that ``name`` stands for (``unet`` -> ``diffusion_model``, ``clip-l`` ->
    ``clip_l``); ``name`` itself when it names none, for the caller's error to quote."""
    return _COMPONENT_ALIASES.get(_squashed(name), name)
