"""What a LoRA's metadata says (kohya ``ss_*``, ModelSpec, diffusers' adapter config) about
its family, ranks and alphas, checked against what its tensors say.

Metadata narrows what the weights leave open and is checked against them; the weights decide
when they disagree: a file renamed, resized or merged keeps its old training metadata.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from .families import ALL_FAMILIES, SD3_FAMILIES, names
from .keys import Parsed


def num(value: float) -> str:
    return f"{value:g}"

# --- metadata vocabularies ------------------------------------------------------------------

# kohya ss_base_model_version: model_util.get_model_version_str_for_sd1_sd2 ("sd_v1[_v]",
# "sd_v2[_v]"), sdxl_model_util ("sdxl_base_v1-0"), flux_utils ("flux1", "chroma") and the
# MMDiT's model_type for SD3 (sd3_utils: "medium", "5-large", "5-medium").
_SS_BASE = {"sd_v1": {"sd1"}, "sd_v1_v": {"sd1"}, "sd_v2": {"sd2"}, "sd_v2_v": {"sd2"},
            "sdxl_base_v1-0": {"sdxl"}, "flux1": {"flux1"}, "chroma": {"flux1"},
            "medium": {"sd3-medium"}, "5-large": {"sd3.5-large"}, "5-medium": {"sd3.5-medium"}}
# ModelSpec architecture ids (ModelSpec README; kohya sai_model_spec.py spells SD3 as
# "stable-diffusion-3-<type>" and FLUX as "flux-1-dev|schnell", "flux-1", "chroma").
_MODELSPEC = (
    (re.compile(r"^stable-diffusion-v1"), {"sd1"}),
    (re.compile(r"^stable-diffusion-v2"), {"sd2"}),
    (re.compile(r"^stable-diffusion-xl-v1-refiner"), {"sdxl-refiner"}),
    (re.compile(r"^stable-diffusion-xl"), {"sdxl"}),
    (re.compile(r"^stable-diffusion-v?3-5-large"), {"sd3.5-large"}),
    (re.compile(r"^stable-diffusion-v?3-5-medium"), {"sd3.5-medium"}),
    (re.compile(r"^stable-diffusion-v?3-medium"), {"sd3-medium"}),
    (re.compile(r"^stable-diffusion-v?3"), set(SD3_FAMILIES)),
    (re.compile(r"^(flux-1|chroma)"), {"flux1"}),
)
# LyCORIS algo names (lycoris/config.py) in kohya's ss_network_args, as our formats.
_ALGOS = {"lora": "kohya-lora", "locon": "kohya-lora", "dylora": "kohya-lora",
          "loha": "lycoris-loha", "lokr": "lycoris-lokr", "ia3": "lycoris-ia3",
          "full": "lycoris-full", "glora": "lycoris-glora", "diag-oft": "lycoris-oft",
          "boft": "lycoris-boft"}


def metadata_families(metadata: Mapping[str, str], reasons: list[str]) -> set[str] | None:
    claims: list[tuple[str, set[str]]] = []
    base = metadata.get("ss_base_model_version")
    if base:
        if base in _SS_BASE:
            claims.append((f"ss_base_model_version={base}", _SS_BASE[base]))
        else:
            reasons.append(f"metadata ss_base_model_version={base} is no family ckptkit knows")
    arch = metadata.get("modelspec.architecture") or ""
    if arch:
        found = next((fams for rx, fams in _MODELSPEC if rx.match(arch.split("/")[0])), None)
        if found:
            claims.append((f"modelspec.architecture={arch}", set(found)))
        else:
            reasons.append(f"metadata modelspec.architecture={arch} is no family ckptkit knows")
    if metadata.get("ss_v2") == "True":
        claims.append(("ss_v2=True", {"sd2"}))
    if not claims:
        return None
    together = set(ALL_FAMILIES)
    for _, fams in claims:
        together &= fams
    said = ", ".join(c for c, _ in claims)
    if not together:
        reasons.append(f"the metadata contradicts itself ({said}): not used")
        return None
    reasons.append(f"metadata {said}: {names(together)}")
    if base == "chroma" or arch.startswith("chroma"):
        reasons.append("Chroma is a FLUX.1 [schnell] derivative with FLUX.1's block names; "
                       "ckptkit reports it as flux1")
    elif arch.startswith("flux-1-"):
        reasons.append(f"trained on {arch.split('/')[0]}; FLUX.1 dev and schnell LoRAs have the "
                       "same layers")
    return together


def _diffusers_config(metadata: Mapping[str, str], reasons: list[str]) -> dict | None:
    """Ranks, alphas and flags of diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig dicts,
    each key prefixed with its component: ``transformer.lora_alpha``...; lora_base.py)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = _json_metadata(raw)
    if config is None:
        reasons.append("metadata lora_adapter_metadata is not valid JSON: not used")
        return None
    if not isinstance(config, dict):
        return None
    out: dict = {"ranks": set(), "alphas": set(), "dora": False, "rslora": False}
    unreadable: set[str] = set()

    def numbers(key: str, value) -> list[float]:
        items = value.values() if isinstance(value, dict) else [value]
        found = [_as_float(v) for v in items if isinstance(v, int | float)
                 and not isinstance(v, bool)]
        if None in found:  # NaN, infinity or an integer beyond any float
            unreadable.add(key)
        return [v for v in found if v is not None]

    for key, value in config.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("r", "rank_pattern"):
            out["ranks"].update(int(v) for v in numbers(key, value))
        elif leaf in ("lora_alpha", "alpha_pattern"):
            out["alphas"].update(numbers(key, value))
        elif leaf == "use_dora" and value is True:
            out["dora"] = True
        elif leaf == "use_rslora" and value is True:
            out["rslora"] = True
    if unreadable:
        reasons.append(f"metadata lora_adapter_metadata holds values that are not finite "
                       f"numbers ({', '.join(sorted(unreadable))}): those are not used")
    return out


def peft_alpha(metadata: Mapping[str, str], component: str, path: str,
               rank: int) -> float | None:
    """The alpha diffusers' ``lora_adapter_metadata`` gives the module at ``path`` (dotted, in
    the component whose prefix is ``component``: "unet", "transformer", "text_encoder"...): its
    ``alpha_pattern`` entry (a module path or a suffix of one, as PEFT matches them; read as
    plain text, never as a regular expression), else the component's ``lora_alpha``. With
    ``use_rslora`` the scale is alpha/sqrt(r): the alpha returned gives that scale as
    alpha/r. None when the metadata says nothing usable."""
    config = _json_metadata(metadata.get("lora_adapter_metadata") or "")
    if not isinstance(config, dict):
        return None
    patterns = config.get(f"{component}.alpha_pattern")
    found = None
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if isinstance(pattern, str) and (path == pattern or path.endswith("." + pattern)):
                found = _number(value)
                break
    if found is None:
        found = _number(config.get(f"{component}.lora_alpha"))
    if found is not None and config.get(f"{component}.use_rslora") is True:
        found *= math.sqrt(rank)
    return found


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return _as_float(value)


def _as_float(text: object) -> float | None:
    """A finite number from metadata, or None (not a number, NaN, infinite, too large)."""
    try:
        value = float(text) if text is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _is_number_text(text: str) -> bool:
    """Whether ``float`` reads ``text`` at all (``nan``, ``1e400`` included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _json_metadata(text: str) -> object | None:
    """A metadata value's JSON, or None when it is not JSON a reader can take: malformed, or
    nested too deep for the parser (a RecursionError, not a ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _network_args(metadata: Mapping[str, str]) -> dict:
    args = _json_metadata(metadata.get("ss_network_args") or "{}")
    return args if isinstance(args, dict) else {}


# --- the detector -----------------------------------------------------------------------------


def read_alphas(adapters: list[Parsed], fmt: str, values: Mapping[str, float],
            metadata: Mapping[str, str], ranks: list[int], dora: bool,
            reasons: list[str]) -> list[float] | None:
    """The alphas the file stores (or its metadata gives), checked against the metadata."""
    alpha_keys = [m.roles["alpha"] for m in adapters if "alpha" in m.roles]
    stored = [float(values[k]) for k in alpha_keys if k in values]
    # NaN and infinities are kept, once each, after the numbers: they are what the file holds
    # (and make the adapter unusable); a JSON report writes them as strings.
    odd = sorted({repr(a) for a in stored if not math.isfinite(a)})
    read = sorted({a for a in stored if math.isfinite(a)}) + [float(a) for a in odd]
    alphas: list[float] | None = read or None
    kohya_like = fmt in ("kohya-lora", "lycoris-loha", "lycoris-lokr", "lycoris-glora")
    if alpha_keys:
        got = sum(1 for k in alpha_keys if k in values)
        reasons.append(f"alphas read from {got} of {len(alpha_keys)} .alpha tensors" if got
                       else f"{len(alpha_keys)} .alpha tensors, whose values were not read")
        without = len(adapters) - len(alpha_keys)
        if without and kohya_like:
            reasons.append(f"{without} adapted module{'s have' if without > 1 else ' has'} no "
                           ".alpha tensor: alpha = rank there (scale 1)")
        if 0.0 in read and kohya_like:
            reasons.append("an alpha of 0 means alpha = rank (scale 1) to kohya and ComfyUI, "
                           "not a scale of 0")
    elif kohya_like:
        reasons.append("no .alpha tensors: kohya and ComfyUI then use alpha = rank (scale 1)")
    if odd:
        count = sum(1 for a in stored if not math.isfinite(a))
        reasons.append(f"{count} .alpha tensor{'s hold' if count > 1 else ' holds'} "
                       f"{' or '.join(odd)}: applying this adapter would give NaN or infinite "
                       "weights")

    # kohya sd-scripts' training metadata (train_util.py, ss_*).
    args = _network_args(metadata)
    dim_text = metadata.get("ss_network_dim")
    if dim_text is not None and ranks:
        dims = {d for d in (_as_float(dim_text), _as_float(args.get("conv_dim"))) if d}
        if not dims and _is_number_text(dim_text):
            reasons.append(f"metadata ss_network_dim={dim_text} is not a finite number: not "
                           "used")
        elif not dims:
            reasons.append(f"metadata ss_network_dim={dim_text}: no single rank (resized?)")
        elif {int(d) for d in dims} & set(ranks):
            reasons.append(f"metadata ss_network_dim={dim_text} agrees with the weights")
        else:
            reasons.append(f"metadata ss_network_dim={dim_text}, but the weights have rank(s) "
                           f"{ranks}: the weights decide")
    alpha_text = metadata.get("ss_network_alpha")
    if alpha_text is not None and alpha_keys:
        said = {a for a in (_as_float(alpha_text), _as_float(args.get("conv_alpha")))
                if a is not None}
        if not said:
            reasons.append(f"metadata ss_network_alpha={alpha_text} is not a number")
        elif not read:
            alphas = sorted(said)
            reasons.append(f"alphas taken from metadata ss_network_alpha={alpha_text}"
                           + (f" (conv_alpha={args['conv_alpha']})" if "conv_alpha" in args
                              else ""))
        elif said & set(read):
            reasons.append(f"metadata ss_network_alpha={alpha_text} agrees with the weights")
        else:
            reasons.append(f"metadata ss_network_alpha={alpha_text}, but the .alpha tensors "
                           f"hold {', '.join(num(a) for a in read)}: the weights decide")
    module = metadata.get("ss_network_module")
    if module:
        algo = str(args.get("algo", "lora")).lower() if module.startswith("lycoris") else None
        said_fmt = (_ALGOS.get(algo or "") if algo else
                    "kohya-oft" if "oft" in module else "kohya-lora")
        text = f"metadata ss_network_module={module}" + (f", algo={algo}" if algo else "")
        if said_fmt in (None, fmt):
            reasons.append(text)
        else:
            reasons.append(f"{text} means {said_fmt}, but the tensors are {fmt}: the tensors "
                           "decide")
        if "dora_wd" in args and (str(args["dora_wd"]).lower() == "true") != dora:
            reasons.append(f"metadata dora_wd={args['dora_wd']}, but the tensors "
                           f"{'hold' if dora else 'hold no'} DoRA scales")
    software = metadata.get("software") or ""
    if "ai-toolkit" in software:
        reasons.append(f"written by ai-toolkit (metadata software), in the {fmt} convention")

    config = _diffusers_config(metadata, reasons)
    if config is not None:
        if config["ranks"] and ranks and not config["ranks"] <= set(ranks):
            reasons.append(f"lora_adapter_metadata says rank(s) {sorted(config['ranks'])}, but "
                           f"the weights have {ranks}: the weights decide")
        if config["alphas"] and alphas is None:
            alphas = sorted(config["alphas"])
            reasons.append("alphas taken from diffusers' lora_adapter_metadata (lora_alpha"
                           + ("; rsLoRA scales by alpha/sqrt(r)" if config["rslora"] else "")
                           + ")")
        elif config["alphas"] and alphas is not None and not config["alphas"] <= set(alphas):
            reasons.append("lora_adapter_metadata's lora_alpha differs from the .alpha "
                           "tensors: the tensors decide")
        if config["dora"] != dora:
            reasons.append(f"lora_adapter_metadata use_dora={config['dora']}, but the tensors "
                           f"{'hold' if dora else 'hold no'} DoRA magnitudes")
    if alphas is None and not alpha_keys:
        if fmt in ("peft", "xlabs-flux", "bfl-control-lora", "diffusers-legacy"):
            reasons.append("this format stores no alpha: diffusers and ComfyUI apply it at "
                           "scale 1 unless a config says otherwise")
        elif fmt in ("lycoris-ia3", "lycoris-full"):
            reasons.append("this format has no alpha")
    return alphas

