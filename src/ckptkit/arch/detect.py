"""Says what a checkpoint is from its keys, shapes and metadata: kind, family, variant, layout.

Structure decides first: the file's keys are matched against every family's declared keys in
each layout (prefixed monolithic ``ldm``, bare ``comfyui``). Key names carry block and layer
counts, so they separate SDXL from its refiner, SD3 from SD3.5 and FLUX dev from schnell at
any width. Shapes then decide what names cannot (SD1 and SD2 share UNet key names), find the
variants that live in input channels (inpainting, pix2pix, FLUX Fill and Depth) and tell a
full-size file from a tiny sample. What weights cannot tell (v-prediction, distillation,
whose a VAE or text encoder alone is: SD 1.x, SD2 and SDXL share one VAE's shapes) is taken
from what the file carries: ModelSpec metadata, ckptkit's own, marker keys, training
metadata, and the SHA-256 of known releases; where nothing says, a part alone lists every
family it fits. One component alone is that component (a diffusion model, a text encoder, a
VAE), with or without its checkpoint prefix; several make a checkpoint. Every conclusion
comes with its reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from ..errors import counted
from .diffusers import diffusers_component
from .diffusers_layout import kohya_prefix, layout_table
from .embedding import detect_embedding
from .families import COMPONENT_KINDS, DIFFUSION_MODEL, Family, families
from .keys import KeyTable, Shape
from .layouts import TEXT_MODEL_CHILDREN, lacks_text_model_level
from .releases import lookup

# Keys of the original training code that are not model weights.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}
MARKERS = {"v_pred": "v-prediction", "ztsnr": "zero-terminal-snr",
            "edm_vpred.sigma_max": "edm-v-prediction", "edm_vpred.sigma_min": "edm-v-prediction",
            "edm_mean": "edm (Playground 2.5)", "edm_std": "edm (Playground 2.5)"}
# The input convolution of each diffusion model: its input channels name a variant (read by
# detection, sample generation and merging).
INPUT_CHANNEL_VARIANTS = {"input_blocks.0.0.weight": {4: None, 9: "inpaint", 8: "pix2pix"},
               "img_in.weight": {64: None, 384: "fill", 128: "depth"}}
_LAYOUTS = ("ldm", "kohya", "comfyui")
# A diffusion model lacking more than this share of a family's keys is not that family's.
MISSING_LIMIT = 0.1
# The input convolution under its diffusers name (for the variants above).
_DIFFUSERS_INPUTS = {"input_blocks.0.0.weight": "conv_in.weight",
                     "img_in.weight": "x_embedder.weight"}
# Older SD1 files lack the ``text_model.`` level that transformers added (sd-mecha lists them
# as aliases); they are read as if it were there.
_SD1_TEXT = "cond_stage_model.transformer."
_ALIASES = tuple((_SD1_TEXT + child, _SD1_TEXT + "text_model." + child)
                 for child in TEXT_MODEL_CHILDREN)



@dataclass
class ComponentReport:
    name: str
    kind: str
    prefix: str
    layout: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    size: str  # "full", "tiny" or "other"
    missing_keys: int = 0


# Every kind of file an Identification names (what ``ckpt library list --kind`` accepts).
KINDS = ("checkpoint", "diffusion-model", "text-encoder", "vae", "lora", "embedding",
         "unknown")


@dataclass
class Identification:
    kind: str  # one of KINDS
    family: str | None = None
    variants: list[str] = field(default_factory=list)
    layout: str | None = None
    components: list[ComponentReport] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    compatible_families: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    ambiguous: list[str] = field(default_factory=list)
    closest: str | None = None
    reasons: list[str] = field(default_factory=list)
    sampling: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    embedding: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A few words for messages: "sdxl checkpoint", "vae (fits sd1, sdxl)", "lora"."""
        if self.family:
            return f"{self.family} {self.kind}"
        if self.compatible_families:
            return f"{self.kind} (fits {', '.join(self.compatible_families)})"
        return self.kind

    def same_model(self, other: Identification) -> bool:
        """Whether ``other`` is the same kind of file of the same model: the same family (a
        diffusion model under its checkpoint prefix goes with a checkpoint in the same
        layout, whose keys it shares), or for parts alone (whose weights fit several
        families) a family both fit."""
        models = ("checkpoint", "diffusion-model")
        if self.kind in models and other.kind in models:
            return self.family == other.family and (
                self.kind == other.kind or self.layout == other.layout)
        if self.kind != other.kind:
            return False
        if self.kind in ("text-encoder", "vae"):
            return bool(set(self.compatible_families) & set(other.compatible_families))
        return self.family == other.family


@dataclass(frozen=True)
class _Expected:
    family: Family
    component: str
    layout: str
    keys: frozenset[str]
    full: KeyTable
    tiny: KeyTable


@cache
def _expectations(layout: str) -> tuple[_Expected, ...]:
    """Every family's components in ``layout``, built on first use (the diffusers tables
    take longest and are only needed for files no other layout explains)."""
    out = []
    for fam in families().values():
        for comp in fam.components:
            full = layout_table(fam, comp.name, False, layout)
            tiny = layout_table(fam, comp.name, True, layout)
            if full:
                out.append(_Expected(fam, comp.name, layout, frozenset(full), full, tiny))
    return tuple(out)


def is_leftover(key: str) -> bool:
    """Keys of the training code that no loader needs: noise schedule buffers, the
    autoencoder's training loss, ComfyUI's sampling table (EMA copies are apart)."""
    return (key in _SCHEDULE_BUFFERS or key.startswith(("model.model_sampling.", "loss."))
            or ".loss." in key)


def extra_kind(key: str) -> str | None:
    """What a key that belongs to no component is: ``marker``, ``ema`` (LDM's EMA copies),
    ``loss`` or ``schedule`` (training leftovers), ``scaled-fp8`` (ComfyUI's scales); None
    for any other key. Identification, split/assemble and prune all sort keys by it."""
    if key in MARKERS:
        return "marker"
    if key.startswith("model_ema."):
        return "ema"
    if is_leftover(key):
        return "loss" if "loss." in key else "schedule"
    if key.endswith((".scale_weight", ".scale_input", "scaled_fp8")):
        return "scaled-fp8"
    return None


_EXTRA_GROUPS = {"marker": "markers", "ema": "ema weights (model_ema.*)",
                 "loss": "training loss weights", "schedule": "noise schedule buffers",
                 "scaled-fp8": "scaled-fp8 scales"}


def _split_extras(keys: set[str]) -> tuple[set[str], dict[str, int], list[str]]:
    """Removes training leftovers and marker keys; returns (rest, extra groups, markers)."""
    extra: dict[str, int] = {}
    rest = set()
    for key in keys:
        kind = extra_kind(key)
        if kind is None:
            rest.add(key)
        else:
            extra[_EXTRA_GROUPS[kind]] = extra.get(_EXTRA_GROUPS[kind], 0) + 1
    return rest, extra, sorted(k for k in keys if k in MARKERS)


def _other_kind(keys: set[str], shapes: Mapping[str, Shape]) -> str | None:
    """Names files that are neither models nor LoRAs but are often taken for them."""
    if keys and keys <= {"emb_params", "clip_l", "clip_g", "name", "step", "sd_checkpoint",
                         "sd_checkpoint_name"} | {k for k in keys if k.startswith("string_to_")}:
        return "a textual-inversion embedding"
    if any(k.startswith("control_model.") or "input_hint_block" in k or "zero_convs" in k
           or k.startswith(("controlnet_cond_embedding", "controlnet_down_blocks"))
           for k in keys):
        return "a ControlNet"
    return None


def _shape_mismatches(table: KeyTable, shapes: Mapping[str, Shape]) -> list[str]:
    return [k for k, v in table.items() if k in shapes and tuple(shapes[k]) != tuple(v)]


def _size_and_variant(exp: _Expected, shapes: Mapping[str, Shape],
                      reasons: list[str]) -> tuple[str, str | None, int]:
    """Full-size, tiny or other; the input-channel variant; and the count of odd shapes."""
    best = None
    for size, table in (("full", exp.full), ("tiny", exp.tiny)):
        bad = _shape_mismatches(table, shapes)
        variant, why = None, []
        for key, variants in INPUT_CHANNEL_VARIANTS.items():
            if exp.layout == "diffusers":
                name = next((k for k in bad if k == _DIFFUSERS_INPUTS[key]), None)
            else:
                name = next((k for k in bad if k == key or k.endswith("." + key)), None)
            if name and len(shapes[name]) >= 2 and shapes[name][1] in variants:
                variant = variants[shapes[name][1]]
                bad.remove(name)
                why.append(f"{name} takes {shapes[name][1]} input channels: "
                           f"{variant or 'the standard model'}")
        if best is None or len(bad) < len(best[2]):
            best = (size, variant, bad, why)
    size, variant, bad, why = best
    reasons.extend(why)
    if bad:
        shown = ", ".join(f"{k} {list(shapes[k])} (expected {list(exp.full[k])})"
                          for k in bad[:3])
        reasons.append(f"{counted(len(bad), 'shape')} {'differs' if len(bad) == 1 else 'differ'}"
                       f" from {exp.family.id}'s {exp.component}: "
                       f"{shown}")
        size = "other"
    return size, variant, len(bad)


def _match(keys: set[str], layout: str) -> list[tuple[Family, list[_Expected], int]]:
    """Candidate families for ``keys`` in ``layout``, best first, with their components."""
    by_family: dict[str, list[_Expected]] = {}
    for exp in _expectations(layout):
        hits = len(exp.keys & keys)
        if hits and hits >= len(exp.keys) // 2:
            by_family.setdefault(exp.family.id, []).append(exp)
    ranked = []
    for fid, exps in by_family.items():
        exps = _outermost(exps, keys)
        covered = set().union(*(e.keys for e in exps))
        score = len(covered & keys) - len(covered - keys) - len(keys - covered)
        ranked.append((families()[fid], exps, score))
    ranked.sort(key=lambda r: -r[2])
    return ranked


def _outermost(exps: list[_Expected], keys: set[str]) -> list[_Expected]:
    """``exps`` less those whose keys in ``keys`` another one explains with more: in bare
    names a CLIP-L's keys are the first layers of a CLIP-G's, so a CLIP-G alone is not also
    a CLIP-L (its optional keys, which the other may not list, aside)."""
    found = {id(e): {k for k in e.keys & keys if not e.family.component(e.component).optional(k)}
             for e in exps}
    return [e for e in exps if not any(
        o is not e and found[id(e)] <= o.keys and len(o.keys & keys) > len(e.keys & keys)
        for o in exps)]


def identify(shapes: Mapping[str, Shape], dtypes: Mapping[str, str],
             metadata: Mapping[str, str], sha256: str | None = None) -> Identification:
    """Identifies a file from its header: ``shapes`` and ``dtypes`` by key, its metadata,
    and its SHA-256 if computed. LoRAs are not told apart here but above, by ``lora.detect``
    (``ops.inspect.identify_checkpoint``)."""
    result = _identify(shapes, dtypes, metadata)
    if sha256:
        _apply_release(result, sha256)
    return result


def _apply_release(result: Identification, sha256: str) -> None:
    """A known release's hash settles what the weights could not (turbo, v-prediction)."""
    release = lookup(sha256)
    if release is None:
        result.reasons.append("its SHA-256 is not one of the official releases ckptkit knows")
        return
    result.reasons.append(f"its SHA-256 is that of the official {release.name} "
                          f"({release.source})")
    if result.family and release.family != result.family:
        result.reasons.append(f"that release is {release.family}, not {result.family}: the "
                              "weights decide")
        return
    for variant in release.variants:
        if variant not in result.variants:
            result.variants.append(variant)
    result.ambiguous = []
    if result.family:
        result.sampling = asdict(_sampling(families()[result.family], result.variants))


def _unalias(shapes, dtypes):
    """Old key spellings renamed to current ones (with a reason), else the inputs as they are.

    Two spellings lack the ``text_model.`` level: older SD1 checkpoints, and a CLIP text
    encoder saved alone by transformers 5, whose ``CLIPTextModel`` dropped that level from
    its own state dict (``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*``). The
    bare names are read as CLIP's only when the token embedding says CLIP: ``encoder.*``
    alone is also a VAE's or T5's."""
    aliases = _ALIASES
    if lacks_text_model_level(shapes):
        aliases += tuple((child, "text_model." + child) for child in TEXT_MODEL_CHILDREN)
    renamed = {}
    for key in shapes:
        for old, new in aliases:
            if key.startswith(old):
                renamed[key] = new + key[len(old):]
    if not renamed:
        return shapes, dtypes, []
    rename = renamed.get
    return ({rename(k, k): v for k, v in shapes.items()},
            {rename(k, k): v for k, v in dtypes.items()},
            [f"{len(renamed)} text encoder keys lack the 'text_model.' level (an older SD1 "
             "layout, or transformers 5's own names); read as if it were there"])


def _identify(shapes, dtypes, metadata) -> Identification:
    shapes, dtypes, notes = _unalias(shapes, dtypes)
    result = _identify_keys(shapes, dtypes, metadata)
    result.reasons[:0] = notes
    return result


def _identify_keys(shapes, dtypes, metadata) -> Identification:
    all_keys = set(shapes)
    embedding = detect_embedding(shapes)
    if embedding is not None:
        return Identification("embedding", compatible_families=embedding.families,
                              reasons=embedding.reasons, embedding=embedding.to_dict())
    keys, extra, markers = _split_extras(all_keys)
    other = _other_kind(keys, shapes)
    if other:
        return Identification("unknown", extra=extra,
                              reasons=[f"the keys are those of {other}, not of a model "
                                       "checkpoint or one of its components"])
    candidates = [(ranked[0][2], layout, ranked) for layout in _LAYOUTS
                  if (ranked := _match(keys, layout))]
    # The diffusers names are their own; a file the other layouts leave keys of unexplained
    # may be in them (a diffusers component alone, or SD 1.x's three in one file, whose
    # CLIP-L alone would otherwise fit the bare layout)
    if max((c[0] for c in candidates), default=0) < len(keys) and (
            ranked := _match(keys, "diffusers")):
        candidates.append((ranked[0][2], "diffusers", ranked))
    if candidates:
        # The layout that explains the file best: a kohya SDXL file's VAE also fits the
        # ldm layout, but its other components only fit kohya's.
        _, layout, ranked = max(candidates, key=lambda c: c[0])
        return _conclude(ranked, layout, keys, shapes, dtypes, metadata, extra, markers)
    found = diffusers_component({k: shapes[k] for k in keys})
    if found:
        return _diffusers(found, keys, shapes, dtypes, metadata, extra)
    return _unknown(keys, extra)


def _diffusers(found, keys: set[str], shapes, dtypes, metadata, extra) -> Identification:
    name, fid, reasons = found
    counts: dict[str, int] = {}
    for k in keys:
        counts[dtypes[k]] = counts.get(dtypes[k], 0) + 1
    report = ComponentReport(name, COMPONENT_KINDS[name], "", "diffusers", len(keys),
                             sum(_numel(shapes[k]) for k in keys), counts, "full")
    result = Identification(COMPONENT_KINDS[name], layout="diffusers", components=[report],
                            extra=extra, reasons=list(reasons))
    if fid and name == DIFFUSION_MODEL:
        fam = families()[fid]
        result.family = fid
        result.missing = [c for c in fam.component_names if c != name]
        result.sampling = asdict(fam.sampling)
    elif name == "vae":
        latent = next(shapes[k][1] for k in keys if k == "decoder.conv_in.weight")
        result.compatible_families = [f.id for f in families().values()
                                      if f.latent_channels == latent]
        named = named_family(metadata)
        if named and named[0].id in result.compatible_families:
            result.family = named[0].id
            result.reasons.append(f"this vae fits {', '.join(result.compatible_families)}; "
                                  f"{named[1]} names {named[0].id}")
    return result


def _conclude(ranked, layout: str, keys: set[str], shapes, dtypes, metadata, extra,
              markers) -> Identification:
    best_score = ranked[0][2]
    tied = [r for r in ranked if r[2] == best_score]
    reasons: list[str] = []
    named = named_family(metadata)
    if len(tied) > 1:
        # Same key names (SD1 and SD2 UNets, components shared by several families): shapes
        # decide; where they cannot either, the file's metadata does.
        odd = {id(r): sum(min(len(_shape_mismatches(e.full, shapes)),
                              len(_shape_mismatches(e.tiny, shapes))) for e in r[1])
               for r in tied}  # shapes that fit neither full size nor tiny, per candidate
        tied.sort(key=lambda r: odd[id(r)])
        fitting = [r for r in tied if odd[id(r)] == odd[id(tied[0])]]
        chosen = next((r for r in fitting if named and r[0].id == named[0].id), fitting[0])
        tied.remove(chosen)
        tied.insert(0, chosen)
        lone = len(chosen[1]) == 1 and chosen[1][0].component != DIFFUSION_MODEL
        if len(fitting) == 1 and not lone:
            reasons.append(f"key names fit {', '.join(r[0].id for r in tied)} equally; shapes "
                           f"fit {chosen[0].id} best")
        elif not lone:
            # (a part alone says which families it fits itself, in _fit_part)
            reasons.append(f"key names and shapes fit {', '.join(r[0].id for r in fitting)} "
                           "alike; " + (f"{named[1]} names {chosen[0].id}" if named and
                                        chosen[0].id == named[0].id else
                                        f"taken as {chosen[0].id}, the first declared"))
    fam, exps, _ = tied[0]
    exps = sorted(exps, key=lambda e: fam.component_names.index(e.component))
    lone_part = len(exps) == 1 and exps[0].component != DIFFUSION_MODEL
    components = []
    variants: list[str] = []
    covered: set[str] = set()
    for exp in exps:
        comp = fam.component(exp.component)
        present = exp.keys & keys
        covered |= present
        size, variant, _ = _size_and_variant(exp, shapes, reasons)
        if variant:
            variants.append(variant)
        missing = sum(not comp.optional(k) for k in exp.keys - keys)
        prefix = comp.prefix(layout) or (
            kohya_prefix(fam, exp.component) if layout == "kohya" else "")
        counts: dict[str, int] = {}
        for k in present:
            counts[dtypes[k]] = counts.get(dtypes[k], 0) + 1
        params = sum(_numel(shapes[k]) for k in present)
        components.append(ComponentReport(exp.component, COMPONENT_KINDS[exp.component], prefix,
                                          layout, len(present), params, counts, size, missing))
        whose = f"a {exp.component}" if lone_part else f"{fam.id}'s {exp.component}"
        reasons.append(f"{len(present)} of {len(exp.keys)} keys of {whose} "
                       f"{'under ' + repr(prefix) if prefix else '(bare names)'}"
                       + (f"; {missing} missing" if missing else ""))
    names = [c.name for c in components]
    model = next((c for c in components if c.name == DIFFUSION_MODEL), None)
    if model and model.missing_keys > MISSING_LIMIT * (model.tensors + model.missing_keys):
        return _not_quite(fam, layout, model, components, extra, reasons)
    unexplained = keys - covered
    if unexplained:
        extra["unexplained keys"] = len(unexplained)
        reasons.append(f"{counted(len(unexplained), 'key')} "
                       f"{'belongs' if len(unexplained) == 1 else 'belong'} to no component, e.g. "
                       f"{', '.join(sorted(unexplained)[:3])}")
    # One component alone is that component, whether under its checkpoint prefix or not
    # (ComfyUI's diffusion-model loader strips ``model.diffusion_model.``, as
    # unet_prefix_from_state_dict finds it); several make a checkpoint.
    kind = "checkpoint" if len(names) > 1 else COMPONENT_KINDS[names[0]]
    result = Identification(kind, layout=layout, components=components, extra=extra,
                            reasons=reasons)
    if len(names) == 1 and components[0].prefix:
        reasons.append(f"a {names[0]} alone, under its checkpoint prefix "
                       f"{components[0].prefix!r}")
    if lone_part:
        _fit_part(result, exps[0], covered, shapes, named)
    else:
        result.family = fam.id
        result.missing = [c for c in fam.component_names if c not in names]
    result.variants = variants
    _apply_metadata(result, fam, metadata, markers, named)
    if result.family and not lone_part:
        result.sampling = asdict(_sampling(fam, result.variants))
    return result


def _fit_part(result: Identification, exp: _Expected, present: set[str], shapes,
              named: tuple[Family, str] | None) -> None:
    """A text encoder or VAE alone: every family whose component it can be; the one its
    metadata names among them, since the weights cannot tell."""
    name = exp.component
    shared = [f.id for f in families().values() if _same_component(f, exp, present, shapes)]
    result.compatible_families = shared
    if not shared:
        result.reasons.append(f"this {name} has the shapes of no family's {name}")
        return
    fits = f"this {name} fits {', '.join(shared)}"
    if named and named[0].id in shared:
        result.family = named[0].id
        result.reasons.append(f"{fits}; {named[1]} names {named[0].id}")
        return
    if len(shared) == 1:
        result.family = shared[0]
        fits += " only"
    if named:
        result.reasons.append(f"{fits}, not {named[0].id} that {named[1]} names: the weights "
                              "decide")
    elif len(shared) > 1:
        result.reasons.append(f"{fits}: a part alone does not tell which model it was "
                              "trained with, and its metadata does not say")
    else:
        result.reasons.append(fits)


def named_family(metadata: Mapping[str, str]) -> tuple[Family, str] | None:
    """The family the file's metadata names, and which entry names it: ModelSpec's
    ``modelspec.architecture`` (the part before a ``/``), ckptkit's own ``ckptkit.family``
    (what split, assemble and the other commands write), kohya's
    ``ss_base_model_version``; None when none names a family ckptkit knows."""
    fams = families()
    for key in ("modelspec.architecture", "ckptkit.family", "ss_base_model_version"):
        value = metadata.get(key)
        if not isinstance(value, str) or not value:
            continue
        word = value.split("/")[0]
        found = fams.get(word) if key == "ckptkit.family" else next(
            (f for f in fams.values() if word in f.architectures), None)
        if found:
            return found, f"its metadata ({key} {value!r})"
    return None



def _not_quite(fam: Family, layout: str, model: ComponentReport,
               components: list[ComponentReport], extra: dict[str, int], reasons: list[str]
               ) -> Identification:
    """A diffusion model that lacks much of the closest family's: another architecture
    built from the same blocks (fewer layers per block, a research variant) or a damaged
    file; either way not a model of that family to load, merge or sample with."""
    why = (f"it lacks {model.missing_keys} of the {model.tensors + model.missing_keys} keys "
           f"of {fam.id}'s diffusion model: another architecture or a damaged file, not "
           "that model")
    result = Identification("unknown", layout=layout, components=components, extra=extra,
                            reasons=[*reasons, why])
    result.closest = f"{fam.id} {DIFFUSION_MODEL} ({layout})"
    return result


def _same_component(fam: Family, exp: _Expected, present: set[str], shapes) -> bool:
    """Whether ``present`` (a component's keys in the file) can be ``fam``'s component of
    the same name: it has every key that component needs, none it lacks but those files may
    hold or not (``Component.optional``: CLIP-L's text_projection, which assemble, ComfyUI
    and diffusers take or leave for SD3 and FLUX alike), and the same shapes."""
    try:
        comp = fam.component(exp.component)
    except KeyError:
        return False
    for tiny in (False, True):
        table = layout_table(fam, comp.name, tiny, exp.layout)
        if (all(k in present or comp.optional(k) for k in table)
                and all(k in table or comp.optional(k) for k in present)
                and not _shape_mismatches(table, shapes)):
            return True
    return False


def _sampling(fam: Family, variants: list[str]):
    for name, sampling in fam.distilled.items():
        if name in variants:
            return sampling
    return fam.sampling


def _apply_metadata(result: Identification, fam: Family, metadata: Mapping[str, str],
                    markers: list[str], named: tuple[Family, str] | None) -> None:
    """Adds what only the file's own words can say: prediction type, distillation, title.
    ``named``: the family the metadata names (``named_family``)."""
    arch = metadata.get("modelspec.architecture", "")
    part = result.kind in ("text-encoder", "vae")
    if named and result.family and not part:
        if named[0].id != result.family:
            result.reasons.append(f"{named[1]} names {named[0].id} but the weights are "
                                  f"{result.family}'s; the weights decide")
        else:
            result.reasons.append(f"{named[1]} agrees")
    if arch:
        if not any(arch.split("/")[0] in f.architectures for f in families().values()):
            result.reasons.append(f"ModelSpec architecture {arch!r} is not one ckptkit knows")
        for word, variant in (("768-v", "v-prediction"), ("turbo", "turbo"),
                              ("inpainting", "inpaint"), ("edit", "pix2pix")):
            if word in arch and variant not in result.variants:
                result.variants.append(variant)
                result.reasons.append(f"ModelSpec architecture {arch!r} names the {variant} "
                                      "variant")
    prediction = metadata.get("modelspec.prediction_type") or metadata.get(
        "modelspec.predict_key")
    if prediction in ("v", "v_prediction") and "v-prediction" not in result.variants:
        result.variants.append("v-prediction")
        result.reasons.append(f"metadata says prediction type {prediction!r}")
    for key in markers:
        variant = MARKERS[key]
        if variant not in result.variants:
            result.variants.append(variant)
            result.reasons.append(f"marker key {key!r}: {variant}")
    if part:  # what follows is about diffusion models
        return
    if result.family == "sd2" and not {"v-prediction", "inpaint"} & set(result.variants):
        result.ambiguous.append("v-prediction")
        result.reasons.append("SD2 512 (epsilon) and 768 (v-prediction) models have the same "
                              "weights and this file does not say which it is")
    if fam.distilled and not set(fam.distilled) & set(result.variants):
        result.ambiguous.extend(sorted(fam.distilled))
        result.reasons.append(f"{fam.name} and its distilled release "
                              f"({', '.join(fam.distilled)}) have the same weights layout; "
                              "nothing in the file says it is the distilled one")


def _unknown(keys: set[str], extra: dict[str, int]) -> Identification:
    """No family fits: name the closest declaration and what differs."""
    best = None
    for exp in (e for layout in (*_LAYOUTS, "diffusers") for e in _expectations(layout)):
        hits = len(exp.keys & keys)
        if hits and (best is None or hits > best[0]):
            best = (hits, exp)
    result = Identification("unknown", extra=extra)
    if best is None:
        result.reasons.append("no key matches any known model component")
        return result
    hits, exp = best
    result.closest = f"{exp.family.id} {exp.component} ({exp.layout})"
    missing = sorted(exp.keys - keys)
    result.reasons.append(f"closest: {result.closest}, {hits} of {len(exp.keys)} keys present; "
                          f"missing e.g. {', '.join(missing[:3])}; "
                          f"{len(keys - exp.keys)} other keys")
    return result


def _numel(shape: Shape) -> int:
    total = 1
    for d in shape:
        total *= d
    return total

