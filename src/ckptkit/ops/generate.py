"""``generate``: an image from a checkpoint (or a mix of parts) and a prompt, with the settings
the model was made for, saved as a PNG that says how it was made.

Settings come, strongest first, from the user's options, a ``--preset``, the distilled release
the file is recognised as (ModelSpec metadata, or the SHA-256 of an official release:
``arch.releases``), and the family's published defaults (``Family.sampling``). A distilled
model run with its base model's settings (50 steps, CFG 7) gives a burnt or grey image, so
the recognised releases matter: SDXL Turbo gets 1 step without guidance, FLUX.1 [schnell] 4.

The PNG carries AUTOMATIC1111's ``parameters`` text chunk, which A1111, Forge, ComfyUI's
loaders and Civitai read: the prompt, ``Negative prompt:``, then ``Key: value`` pairs joined by
", " in A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model,
VAE hash, VAE, Version), a value quoted as JSON when it holds a comma, colon or newline (A1111's
``create_infotext`` and ``infotext_utils.quote``). The model hash is A1111's short hash (the
first 10 hex digits of the file's SHA-256, "AutoV2"). The initial noise comes from a CPU
generator seeded with ``seed``, so the same seed and settings give the same image bit for bit
on one device, and the same noise on any device.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .. import __version__
from ..arch.releases import lookup
from ..engine.atomic import AtomicOutput, check_output_path
from ..errors import UsageError, a_or_an
from ..formats.checkpoint import paused_gc
from .hashing import BackgroundSha256, lora_sha256
from .image_inputs import TASKS, Inputs, read_inputs
from .load import Plan, build, lora_spec, plan_loras, plan_pipeline


@dataclass(frozen=True)
class Sampler:
    """A sampler as A1111 names it in the infotext, and the diffusers scheduler that is it."""

    label: str
    scheduler: str
    options: tuple[tuple[str, Any], ...] = ()


# Names users type (A1111's, lower-cased and with _ for spaces) -> the diffusers scheduler.
SAMPLERS = {
    "euler": Sampler("Euler", "EulerDiscreteScheduler"),
    "euler_a": Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    "ddim": Sampler("DDIM", "DDIMScheduler"),
    "plms": Sampler("PLMS", "PNDMScheduler"),
    "dpmpp_2m": Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                               (("use_karras_sigmas", True),)),
    "lcm": Sampler("LCM", "LCMScheduler"),
}
_FLOW = Sampler("Euler", "FlowMatchEulerDiscreteScheduler")  # SD3 and FLUX: the only one
_DEFAULT_LABELS = {"PNDMScheduler": "plms", "EulerDiscreteScheduler": "euler"}
# Samplers of the distilled SDXL models: Euler on "trailing" timesteps (the last step at
# t=999), as their model cards require.
_TRAILING = (("timestep_spacing", "trailing"),)


@dataclass(frozen=True)
class Preset:
    """Settings of a distilled model: what its publisher's model card runs it with."""

    name: str
    families: tuple[str, ...]
    steps: int
    guidance: float
    sampler: Sampler | None
    size: tuple[int, int] | None
    source: str


PRESETS = {
    # stabilityai/sdxl-turbo model card: num_inference_steps=1, guidance_scale=0.0, made for
    # 512x512; its scheduler config is Euler ancestral on trailing timesteps. SD 3.5 Large
    # Turbo (stabilityai/stable-diffusion-3.5-large-turbo card): 4 steps, guidance 0.0.
    "turbo": Preset("turbo", ("sdxl", "sd3.5-large"), 1, 0.0,
                    replace(SAMPLERS["euler_a"], options=_TRAILING), (512, 512),
                    "stabilityai/sdxl-turbo and stable-diffusion-3.5-large-turbo model cards"),
    # black-forest-labs/FLUX.1-schnell model card: 4 steps, guidance_scale=0.0,
    # max_sequence_length=256.
    "schnell": Preset("schnell", ("flux1-schnell", "flux1-dev"), 4, 0.0, None, None,
                      "black-forest-labs/FLUX.1-schnell model card"),
    # ByteDance/SDXL-Lightning model card: Euler on trailing timesteps, guidance_scale=0,
    # as many steps as the checkpoint was distilled for (2, 4 or 8; 4 here, --steps for
    # the others).
    "lightning": Preset("lightning", ("sdxl",), 4, 0.0,
                        replace(SAMPLERS["euler"], options=_TRAILING), None,
                        "ByteDance/SDXL-Lightning model card"),
    # latent-consistency/lcm-lora-sdxl and lcm-lora-sdv1-5 model cards: LCMScheduler,
    # 4 steps, guidance_scale=1 (no classifier-free guidance).
    "lcm": Preset("lcm", ("sd1", "sdxl"), 4, 1.0, SAMPLERS["lcm"], None,
                  "latent-consistency/lcm-lora-sdxl and lcm-lora-sdv1-5 model cards"),
}


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SLG): a further guidance term away from the model's prediction
    with some of its layers skipped, over part of the steps (diffusers'
    ``StableDiffusion3Pipeline`` arguments ``skip_guidance_layers`` etc.)."""

    family: str
    scale: float
    layers: tuple[int, ...]
    start: float  # the share of the steps where it starts and stops
    stop: float
    source: str


# Stability AI's reference implementation of SD3.5 (Stability-AI/sd3.5, sd3_infer.py,
# CONFIGS["sd3.5_medium"]["skip_layer_config"]): scale 2.5 on layers 7, 8 and 9, from 1% to
# 30% of the steps, for SD3.5 Medium only; used there when asked (--skip_layer_cfg True; its
# README: "optionally ... for potentially better structure and anatomy coherency"), so off
# by default here too. Others' defaults differ: ComfyUI's SkipLayerGuidanceSD3 node 3.0 from
# 1% to 15%, diffusers' pipeline 2.8 from 1% to 20% (the same layers).
SLG = SkipLayerGuidance("sd3.5-medium", 2.5, (7, 8, 9), 0.01, 0.30,
                        "Stability-AI/sd3.5 sd3_infer.py, SD3.5 Medium")
# The preset a recognised distilled release gets without being asked (its variant name).
_DISTILLED = {"turbo": "turbo"}
_FLUX_SCHNELL_TOKENS = 256  # FLUX.1 [schnell] model card: max_sequence_length=256


@dataclass
class Settings:
    steps: int
    guidance: float
    sampler: Sampler
    width: int
    height: int
    seed: int
    preset: str | None = None
    sources: list[str] = field(default_factory=list)  # where the settings came from
    strength: float | None = None  # how much of an input image is redone (img2img, fill)
    image_guidance: float | None = None  # InstructPix2Pix's image CFG scale
    slg: float | None = None  # the skip-layer guidance scale (SD3.5 Medium), None: off


def _flow(plan: Plan) -> bool:
    return plan.scheduler["_class_name"] == _FLOW.scheduler


def _default_sampler(plan: Plan) -> Sampler:
    if _flow(plan):
        return _FLOW
    return SAMPLERS[_DEFAULT_LABELS.get(plan.scheduler["_class_name"], "euler")]


def parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) <= 0:
        raise UsageError(f"--size takes WIDTHxHEIGHT in pixels, e.g. 1024x1024, not {text!r}")
    return size


def settings(plan: Plan, *, preset: str | None = None, steps: int | None = None,
             guidance: float | None = None, sampler: str | None = None,
             size: tuple[int, int] | None = None, seed: int | None = None,
             variants: Sequence[str] = (), strength: float | None = None,
             image_guidance: float | None = None, slg: float | None = None) -> Settings:
    """The settings to generate with: the options given, else ``preset``'s, else those of
    the distilled release ``variants`` name, else those of the task a model that starts
    from an image does (``image_inputs.TASKS``), else the family's."""
    fam = plan.family
    base = fam.sampling
    chosen = Settings(base.steps, base.guidance, _default_sampler(plan), *base.resolution,
                      seed=0, sources=[f"{fam.name} defaults"])
    _task_settings(plan, chosen, strength, image_guidance)
    name = preset or next((_DISTILLED[v] for v in variants if v in _DISTILLED), None)
    if name:
        if name not in PRESETS:
            raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
        found = PRESETS[name]
        if fam.id not in found.families:
            raise UsageError(f"the {name} preset is for {', '.join(found.families)} models, "
                             f"not {fam.name}")
        distilled = fam.distilled.get(name)  # the family's own record of the release
        chosen.steps = distilled.steps if distilled else found.steps
        chosen.guidance = distilled.guidance if distilled else found.guidance
        if found.sampler and not _flow(plan):
            chosen.sampler = found.sampler
        if found.size or distilled:
            chosen.width, chosen.height = distilled.resolution if distilled else found.size
        chosen.preset = name
        how = "asked for" if preset else "the file is recognised as that release"
        chosen.sources = [f"the {name} preset ({found.source}; {how})"]
    if steps is not None:
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, not {steps}")
        chosen.steps = steps
    if guidance is not None:
        if guidance < 0:
            raise UsageError(f"--guidance must be 0 or more, not {guidance}")
        chosen.guidance = guidance
    if sampler is not None:
        chosen.sampler = _sampler(plan, sampler)
    if size is not None:
        chosen.width, chosen.height = size
    if slg is not None:
        _check_slg(plan, chosen, slg)
        chosen.slg = slg
    if chosen.strength is not None and int(chosen.steps * chosen.strength) < 1:
        # diffusers runs the last int(steps * strength) steps: none would leave noise
        raise UsageError(f"at strength {_number(chosen.strength)}, {chosen.steps} steps "
                         "redo none of the image; give more --steps or a higher --strength")
    multiple = 16 if _flow(plan) else 8
    if chosen.width % multiple or chosen.height % multiple:
        raise UsageError(f"{fam.name} makes images whose sides are multiples of {multiple}; "
                         f"{chosen.width}x{chosen.height} is not")
    chosen.seed = secrets.randbelow(2**32) if seed is None else seed
    if not 0 <= chosen.seed < 2**64:
        raise UsageError(f"--seed must be between 0 and 2**64 - 1, not {chosen.seed}")
    return chosen


def _task_settings(plan: Plan, chosen: Settings, strength: float | None,
                   image_guidance: float | None) -> None:
    """The task's own steps, guidance and sampler where its publisher gives them, and its
    strength and image guidance (the option given, else the diffusers pipeline's default)."""
    task = TASKS.get(plan.pipeline)
    if task is None or not (task.strength or task.image_guidance):
        for name, value in (("strength", strength), ("image-guidance", image_guidance)):
            if value is not None:
                raise UsageError(f"--{name} is for models that start from an image; "
                                 f"{plan.family.name}'s {plan.pipeline} takes none")
    if task is None:
        return
    if task.steps is not None:
        chosen.steps, chosen.guidance = task.steps, task.guidance
        chosen.sources = [task.source]
    if task.sampler and not _flow(plan):
        chosen.sampler = SAMPLERS[task.sampler]
        chosen.sources = [task.source]
    for name, takes, value in (("strength", task.strength, strength),
                               ("image_guidance", task.image_guidance, image_guidance)):
        option = "--" + name.replace("_", "-")
        if value is not None and not takes:
            raise UsageError(f"{plan.pipeline} takes no {option}")
        if not takes:
            continue
        argument = "strength" if name == "strength" else "image_guidance_scale"
        value = _pipeline_default(plan.pipeline, argument) if value is None else value
        if name == "strength" and not 0 < value <= 1:
            raise UsageError(f"--strength must be more than 0 and at most 1, not {value}")
        if name == "image_guidance" and value < 0:
            raise UsageError(f"--image-guidance must be 0 or more, not {value}")
        setattr(chosen, name, value)


def _check_slg(plan: Plan, chosen: Settings, scale: float) -> None:
    if plan.family.id != SLG.family:
        raise UsageError(f"skip-layer guidance (--slg) is set for SD3.5 Medium's layers "
                         f"{', '.join(map(str, SLG.layers))}, not {plan.family.name}")
    if scale <= 0:
        raise UsageError(f"--slg takes a scale above 0, not {scale:g}")
    if chosen.guidance <= 1:
        raise UsageError("skip-layer guidance works beside classifier-free guidance; with "
                         f"guidance {chosen.guidance:g} there is none (give --guidance above 1)")
    first = int(chosen.steps * SLG.start) + 1  # diffusers: start * steps < i < stop * steps
    if first >= chosen.steps * SLG.stop:
        raise UsageError(f"skip-layer guidance runs from {SLG.start:.0%} to {SLG.stop:.0%} "
                         f"of the steps: {chosen.steps} steps leave it none (give --steps "
                         f"{int(first / SLG.stop) + 1} or more)")


def _pipeline_default(pipeline: str, argument: str) -> float:
    """The default diffusers' ``pipeline`` gives ``argument`` when called."""
    import diffusers

    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters[argument].default


def _sampler(plan: Plan, name: str) -> Sampler:
    key = name.lower().replace(" ", "_").replace("+", "p").replace("-", "_")
    if _flow(plan):
        if key != "euler":
            raise UsageError(f"{plan.family.name} is a flow-matching model: its sampler is "
                             f"euler, not {name!r}")
        return _FLOW
    if key not in SAMPLERS:
        raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {name!r}")
    return SAMPLERS[key]


def _quote(value: Any) -> str:
    """A1111's ``infotext_utils.quote``: JSON when the text would break the list."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(prompt: str, negative: str, chosen: Settings, plan: Plan,
             model: tuple[str, str | None], vae: tuple[str, str | None] | None,
             loras: Sequence[tuple[str, Any, str]] = (),
             inputs: dict[str, str] | None = None) -> str:
    """The ``parameters`` text, as A1111's ``create_infotext`` writes it. ``model`` and
    ``vae``: (name, SHA-256 or None); ``loras``: (name, ``LoraSpec``, A1111's hash);
    ``inputs``: the input images' entries (``image_inputs.Inputs.infotext``)."""
    flux = plan.family.id.startswith("flux")
    params: dict[str, str | None] = {
        "Steps": str(chosen.steps),
        "Sampler": chosen.sampler.label,
        "Schedule type": "Karras" if dict(chosen.sampler.options).get("use_karras_sigmas")
        else None,
        # FLUX.1 has no classifier-free guidance; dev's guidance is a model input, which
        # Forge records as "Distilled CFG Scale"
        "CFG scale": "1" if flux else _number(chosen.guidance),
        "Image CFG scale": None if chosen.image_guidance is None
        else _number(chosen.image_guidance),
        "Distilled CFG Scale": _number(chosen.guidance) if plan.family.id == "flux1-dev"
        else None,
        "Seed": str(chosen.seed),
        "Size": f"{chosen.width}x{chosen.height}",
        "Model hash": model[1][:10] if model[1] else None,
        "Model": model[0],
        "VAE hash": vae[1][:10] if vae and vae[1] else None,
        "VAE": vae[0] if vae else None,
        # A1111 writes the init image's hash, then (img2img's extra_generation_params) the
        # denoising strength; the mask's hash and the control image's are ckptkit's own
        **(inputs or {}),
        "Denoising strength": None if chosen.strength is None else _number(chosen.strength),
        # ckptkit's own entry (A1111 has no SD3 skip-layer guidance)
        "Skip layer guidance": None if chosen.slg is None else
        f"{_number(chosen.slg)} on layers {' '.join(map(str, SLG.layers))} from "
        f"{_number(SLG.start)} to {_number(SLG.stop)}",
        # A1111's Lora extension (scripts/lora_script.py): "name: short hash, ...", the name
        # as in the prompt's tag less ":" and ","
        "Lora hashes": ", ".join(f"{name.translate(_NO_SEPARATORS)}: {sha[:12]}"
                                 for name, _, sha in loras) or None,
        "Version": f"ckptkit {__version__}",
    }
    text = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{_with_tags(prompt, loras)}{negative_text}\n{text}".strip()


_NO_SEPARATORS = str.maketrans("", "", ":,")


def _with_tags(prompt: str, loras: Sequence[tuple[str, Any, str]]) -> str:
    """The prompt with a ``<lora:name:weight>`` tag per LoRA, as A1111's prompt holds one
    (so the text loads them again there): ``<lora:name:te:unet>`` when the text encoders'
    strength differs (A1111's ``extra_networks_lora``: the first number is the text
    encoders', the second the UNet's, which defaults to the first)."""
    tags = []
    for name, spec, _ in loras:
        weights = [spec.strength] if spec.te == spec.strength else [spec.te, spec.strength]
        tags.append(f"<lora:{name.replace(':', '')}:{':'.join(_number(w) for w in weights)}>")
    return " ".join([prompt, *tags]) if tags else prompt


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _model_name(plan: Plan) -> str:
    """The model file's name, or the diffusers folder's that the model comes from."""
    if os.path.isdir(plan.model_path) and plan.folder:
        return os.path.basename(os.path.normpath(plan.folder))
    return _stem(plan.model_path)


def generate(models: Sequence[str], prompt: str, out: str, *, negative: str = "",
             steps: int | None = None, guidance: float | None = None,
             seed: int | None = None, size: tuple[int, int] | None = None,
             sampler: str | None = None, diffusion_model: str | None = None,
             text_encoders: Sequence[str] = (), vae: str | None = None,
             device: str = "cpu", dtype: Any = None, preset: str | None = None,
             tokenizers: Any = None, on_step: Callable[[int, int], None] | None = None,
             fsync: bool = True, loras: Sequence[Any] = (),
             allow_unmatched: bool = False, image: str | None = None,
             mask: str | None = None, strength: float | None = None,
             image_guidance: float | None = None,
             slg: float | None = None) -> dict[str, Any]:
    """Makes the image and writes ``out`` (a PNG, atomically); returns what was done:
    the settings, where they came from, the infotext and the plan's warnings. ``models``:
    files in any order, each taken as what it is (a checkpoint, a diffusion model, a text
    encoder or a VAE); ``on_step(done, total)`` is called after each denoising step;
    ``loras``: as ``load_pipeline`` takes them. ``image`` (and ``mask``, white where to
    repaint): the input of a model that starts from one (``image_inputs.TASKS``), whose
    size the output takes; ``strength`` and ``image_guidance`` where its pipeline has
    them. ``slg``: SD3.5 Medium's skip-layer guidance at that scale (``SLG``)."""
    import torch

    specs = [lora_spec(entry) for entry in loras]
    inputs = [*models, *([diffusion_model] if diffusion_model else []), *text_encoders,
              *([vae] if vae else []), *(s.path for s in specs),
              *(p for p in (image, mask) if p)]
    check_output_path(out, tuple(inputs))
    with ExitStack() as stack, paused_gc():
        roles = _roles(models, diffusion_model, list(text_encoders), vae)
        plan = plan_pipeline(roles["checkpoint"], diffusion_model=roles["diffusion_model"],
                             text_encoders=roles["text_encoders"], vae=roles["vae"],
                             stack=stack)
        plan_loras(plan, specs, allow_unmatched=allow_unmatched, stack=stack)
        try:
            pictures = read_inputs(TASKS.get(plan.pipeline), plan.pipeline, image, mask,
                                   size)
        except UsageError as exc:
            raise UsageError(f"{plan.model_path}: {exc}") from None
        if negative and plan.family.id.startswith("flux"):
            raise UsageError(f"{plan.family.name} takes no negative prompt: its guidance is "
                             "distilled into the model")
        vae_path = roles["vae"]
        # a diffusers folder's diffusion model (shards, perhaps) has no one file to hash
        hashes = BackgroundSha256([p for p in (plan.model_path, vae_path)
                                   if p and os.path.isfile(p)])
        stack.callback(hashes.cancel)
        pipe = build(plan, dtype=dtype, device=device, tokenizers=tokenizers)
        digests = hashes.result()
    release = lookup(digests[plan.model_path]) if digests.get(plan.model_path) else None
    variants = [*plan.variants, *(release.variants if release and
                                  release.family == plan.family.id else ())]
    chosen = settings(plan, preset=preset, steps=steps, guidance=guidance, sampler=sampler,
                      size=pictures.size if pictures else size, seed=seed,
                      variants=variants, strength=strength, image_guidance=image_guidance,
                      slg=slg)
    import diffusers

    scheduler_cls = getattr(diffusers, chosen.sampler.scheduler)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config,
                                               **dict(chosen.sampler.options))
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = dict(prompt=prompt, num_inference_steps=chosen.steps,
                                  guidance_scale=chosen.guidance, width=chosen.width,
                                  height=chosen.height,
                                  generator=torch.Generator("cpu").manual_seed(chosen.seed))
    kwargs.update(_image_arguments(pictures, chosen))
    if chosen.slg is not None:
        kwargs.update(skip_guidance_layers=list(SLG.layers),
                      skip_layer_guidance_scale=chosen.slg,
                      skip_layer_guidance_start=SLG.start, skip_layer_guidance_stop=SLG.stop)
    accepted = inspect.signature(pipe.__call__).parameters  # the refiner takes no size
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if negative:
        kwargs["negative_prompt"] = negative
    if plan.family.id == "flux1-schnell" or chosen.preset == "schnell":
        kwargs["max_sequence_length"] = _FLUX_SCHNELL_TOKENS
    if on_step:
        total = chosen.steps

        def step_end(pipe_, index, _timestep, values):
            # with a strength below 1 the pipeline runs only the last steps
            on_step(index + 1, getattr(pipe_, "_num_timesteps", None) or total)
            return values

        kwargs["callback_on_step_end"] = step_end
    with torch.inference_mode():
        image = pipe(**kwargs).images[0]
    text = infotext(prompt, negative, chosen, plan,
                    (_model_name(plan), digests.get(plan.model_path)),
                    (_stem(vae_path), digests.get(vae_path)) if vae_path else None,
                    [(_stem(s.path), s, lora_sha256(s.path)) for s in specs],
                    pictures.infotext if pictures else None)
    _save_png(image, out, text, tuple(inputs), fsync)
    return {"output": out, "family": plan.family.id, "pipeline": plan.pipeline,
            "settings": {**asdict(chosen), "sampler": chosen.sampler.label},
            "parameters": text, "warnings": list(plan.warnings)}


def _image_arguments(pictures: Inputs | None, chosen: Settings) -> dict[str, Any]:
    """The input images and the strengths, under the pipeline's argument names."""
    if pictures is None:
        return {}
    found: dict[str, Any] = dict(pictures.arguments)
    if chosen.strength is not None:
        found["strength"] = chosen.strength
    if chosen.image_guidance is not None:
        found["image_guidance_scale"] = chosen.image_guidance
    return found


def _roles(models: Sequence[str], diffusion_model: str | None, text_encoders: list[str],
           vae: str | None) -> dict[str, Any]:
    """Which file is which, for the positional MODEL files: each is what its header says."""
    from ..formats import open_checkpoint
    from .inspect import identify_checkpoint, is_diffusers_folder

    roles: dict[str, Any] = {"checkpoint": None, "diffusion_model": diffusion_model,
                             "text_encoders": text_encoders, "vae": vae}
    for path in models:
        if os.path.isdir(path) and is_diffusers_folder(path):
            kind = "checkpoint"  # a whole pipeline
        else:
            with open_checkpoint(path) as checkpoint:
                kind = identify_checkpoint(checkpoint).kind
        role = {"checkpoint": "checkpoint", "diffusion-model": "diffusion_model",
                "vae": "vae"}.get(kind)
        if kind == "text-encoder":
            roles["text_encoders"].append(path)
        elif role is None:
            raise UsageError(f"{path} is {a_or_an(kind)}, not a checkpoint or one of its parts")
        elif roles[role]:
            raise UsageError(f"{path} and {roles[role]} are both a {role.replace('_', ' ')}")
        else:
            roles[role] = path
    return roles


def _save_png(image, out: str, text: str, inputs: tuple[str, ...], fsync: bool) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    with AtomicOutput(out, inputs, fsync=fsync) as target:
        with open(target.fd, "wb", closefd=False) as f:
            image.save(f, format="PNG", pnginfo=info)
        target.commit()
