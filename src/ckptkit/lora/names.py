"""The name a LoRA module gets in each output key format, for a weight of a model.

``module_name(family, component, model_key, fmt) -> str``:
    ``family`` a ckptkit family id ("sd1", "sdxl", "flux1-dev"...), ``component`` one of the
    family's components ("diffusion_model", "clip_l", ...), ``model_key`` the weight's
    canonical key (its name in a ComfyUI standalone file of that component, e.g.
    "input_blocks.4.1.proj_in.weight", "double_blocks.0.img_attn.qkv.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.weight"), ``fmt`` one of ``FORMATS``.
    Returns the module name (the tensors' common prefix, without ``.lora_down.weight``...).
    Raises ValueError where the format names the weight's rows as several modules (a fused
    qkv in diffusers' names): ``module_names`` gives those.
``module_names(family, component, model_key, fmt, rows=None) -> tuple[Named, ...]``:
    every module the format names for that weight, with the rows of the weight's change
    each takes (``rows``: the weight's row count when it is not the full-size model's, so
    that the split of a tiny model's fused weight is its own).

The formats, as the tools that read them name layers:

- ``kohya``: ``lora_unet_`` + the module path with "." -> "_" (sd-scripts ``networks/lora.py``,
  ``lora_flux.py``, ``lora_sd3.py``): SD 1.x/2.x U-Nets in diffusers' block names, SDXL and
  the refiner in the original (LDM) ones, SD3 and FLUX in SAI's and BFL's. Text encoders:
  ``lora_te_`` for SD 1.x/2.x's one (and the refiner's CLIP-G, as ComfyUI reads it),
  ``lora_te1_`` CLIP-L and ``lora_te2_`` CLIP-G for SDXL and SD3, ``lora_te3_`` for the T5 of
  SD3 and FLUX (ComfyUI ``comfy/lora.py`` ``model_lora_keys_clip``), transformers' names.
- ``comfyui``: ``diffusion_model.`` + the canonical module path (ComfyUI's LoraSave), and
  ``text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.`` + transformers' path (ComfyUI's
  generic text-encoder keys, ``text_encoders.`` + its CLIP model's state-dict names).
- ``diffusers``: the pipeline's subfolder (``unet.``, ``transformer.``, ``text_encoder.``,
  ``text_encoder_2.``, ``text_encoder_3.``) + the diffusers model's module path, as
  ``save_lora_weights`` writes them. diffusers splits fused weights (SD3's and FLUX's qkv,
  FLUX's ``linear1``) into several layers, so one weight may be several modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ..arch import diffusers_layout
from ..arch.families import DIFFUSION_MODEL, families
from .targets import Names, names

FORMATS = ("kohya", "comfyui", "diffusers")

# kohya's prefix of each text encoder, by family (None: the family's default below).
_KOHYA_TE = {"sd1": {"clip_l": "lora_te_"}, "sd2": {"openclip_h": "lora_te_"},
             "sdxl-refiner": {"clip_g": "lora_te_"}}
_KOHYA_TE_DEFAULT = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
# The families whose U-Net kohya names in diffusers' block names.
_KOHYA_DIFFUSERS_UNET = ("sd1", "sd2")
_COMFY_TE = {"clip_l": "clip_l", "clip_g": "clip_g", "openclip_h": "clip_h", "t5xxl": "t5xxl"}


@dataclass(frozen=True)
class Named:
    """One output module for a weight: its ``name``; ``rows``: the block ``(start, stop)`` of
    the weight's change it holds (None: all of it); ``swap``: its rows are that block with
    the two halves exchanged (diffusers' (scale, shift) order of an adaLN modulation)."""

    name: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def prefix(family: str, component: str, fmt: str) -> str:
    """The prefix of ``component``'s modules in format ``fmt``."""
    if fmt == "kohya":
        if component == DIFFUSION_MODEL:
            return "lora_unet_"
        return _KOHYA_TE.get(family, {}).get(component) or _KOHYA_TE_DEFAULT[component]
    if fmt == "comfyui":
        if component == DIFFUSION_MODEL:
            return "diffusion_model."
        return f"text_encoders.{_COMFY_TE[component]}.transformer."
    if fmt == "diffusers":
        return _subfolders(family)[component] + "."
    raise ValueError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")


@cache
def _subfolders(family: str) -> dict[str, str]:
    _, parts = diffusers_layout.folder(families()[family])
    return {name: sub for sub, (name, _) in parts.items()}


def module_name(family: str, component: str, model_key: str, fmt: str) -> str:
    """The one module name of a weight in ``fmt`` (see the module doc)."""
    found = module_names(family, component, model_key, fmt)
    if len(found) != 1 or found[0].rows is not None or found[0].swap:
        raise ValueError(f"{fmt} names {model_key} of {family} as {len(found)} modules "
                         f"({', '.join(n.name for n in found)}): use module_names")
    return found[0].name


def module_names(family: str, component: str, model_key: str, fmt: str,
                 rows: int | None = None) -> tuple[Named, ...]:
    """Every module ``fmt`` names for the weight ``model_key`` (see the module doc)."""
    table = _table(family, component, model_key, rows)
    path = _path(model_key)
    if path is None or path not in table.canonical:
        raise KeyError(f"{model_key} is no weight of {family}'s {component}")
    pre = prefix(family, component, fmt)
    if fmt == "comfyui":
        return (Named(pre + path),)
    if fmt == "kohya":
        if component == DIFFUSION_MODEL and family in _KOHYA_DIFFUSERS_UNET:
            split = _diffusers_names(table, model_key, rows)
            if len(split) != 1 or split[0].rows or split[0].swap:
                raise KeyError(f"{model_key} has no single diffusers name")
            path = split[0].name
        return (Named(pre + path.replace(".", "_")),)
    return tuple(Named(pre + n.name, n.rows, n.swap)
                 for n in _diffusers_names(table, model_key, rows))


def _path(key: str) -> str | None:
    for leaf in (".weight", ".scale"):
        if key.endswith(leaf):
            return key[: -len(leaf)]
    return None


def _table(family: str, component: str, model_key: str, rows: int | None) -> Names:
    """The names of the full-size model, or of the tiny one where ``rows`` says so."""
    full = names(family, component, False)
    if rows is None or full.rows.get(model_key) == rows:
        return full
    tiny = names(family, component, True)
    return tiny if tiny.rows.get(model_key) == rows else full


def _diffusers_names(table: Names, model_key: str, rows: int | None) -> list[Named]:
    """The diffusers module paths holding rows of canonical weight ``model_key``."""
    total = rows or table.rows[model_key]
    out = []
    for path, move in table.diffusers.items():
        if move.sources[0] != model_key:
            continue
        if move.op == "copy":
            out.append(Named(path))
        elif move.op == "rows":
            out.append(Named(path, move.row_range(total)))
        else:
            out.append(Named(path, None, swap=True))
    if not out:
        raise KeyError(f"diffusers has no name for {model_key}")
    return sorted(out, key=lambda n: n.rows or (0, 0))
