"""``split``, ``assemble`` and ``vae bake``: monolithic checkpoints and their parts.

A split writes each component of a checkpoint (in the original, kohya or diffusers key
names; several components, or one under its checkpoint prefix) as a ComfyUI standalone file
(``diffusion_models/``, ``text_encoders/``, ``vae/``), renamed by ``arch.layouts`` and
``arch.diffusers_layout``. An assemble identifies each part from its header, checks that
the parts belong together (the family's text encoders, a VAE with the latent channels its
diffusion model makes, the same size), and writes them under the family's monolithic
prefixes. Scalars that a standalone file has no place for (open_clip's ``logit_scale``)
travel in the part's metadata, so split then assemble gives back the same tensors bit for
bit. Every output says where it came from in its metadata, merged into the source's less
what describes that file and not the output (its SHA-256, which part it is).

Only a component's own keys go into an output: EMA copies, training leftovers (a VAE's
``loss.*`` discriminator, as A1111's VAE loader ignores them), marker keys and keys no
component has are left out and counted by why. A part that lacks keys its component needs
is refused before anything is written, but for keys files may hold or not
(``Component.optional``: what the family never reads among them) and for those a split
part says, in its metadata, that its source lacked: what split writes, assemble takes back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from ..arch import diffusers_layout
from ..arch.detect import Identification, extra_kind, named_family
from ..arch.families import COMPONENT_KINDS, DIFFUSION_MODEL, Family, component_name, families
from ..arch.keys import KeyTable
from ..arch.layouts import (
    Move,
    current_names,
    standalone_current_names,
    to_canonical,
    to_ldm,
)
from ..engine.moves import plan_moves
from ..engine.writer import OutputBatch, Planned, Progress, write_safetensors
from ..errors import FormatError, UsageError, a_or_an
from ..formats import Checkpoint, open_checkpoint
from ..formats.dtypes import BY_NAME
from ..safe_text import json_text
from .inspect import identify_checkpoint
from .provenance import inherited, provenance, source_hashes
from .prune import SDXL_VAE_FAMILIES

SCALARS_KEY = "ckptkit.scalars"  # JSON: {name: [value, dtype]} of keys a part cannot hold
# JSON: [name, ...], keys of its component that a split part lacks because its source did
ABSENT_KEY = "ckptkit.absent"
FOLDERS = {"diffusion-model": "diffusion_models", "text-encoder": "text_encoders",
           "vae": "vae"}
# Metadata that describes the part it is in, not an output made from it (besides the hashes
# of its bytes, which provenance.inherited leaves out): which part it is, the scalars only a
# part holds.
_PART_METADATA = ("ckptkit.component", "ckptkit.components", SCALARS_KEY, ABSENT_KEY)


class SplitResult(list):
    """The paths ``split`` wrote (a list of them, as it always returned), ``left_out``: the
    source's keys that none of its components has, counted by why, and ``warnings``."""

    def __init__(self, paths: Iterable[str] = (), left_out: dict[str, int] | None = None):
        super().__init__(paths)
        self.left_out = left_out or {}
        self.warnings: list[str] = []


def _inherited(metadata: Mapping[str, str]) -> dict[str, str]:
    """A source's metadata less what is true of that file only."""
    return inherited(metadata, _PART_METADATA)


def _why_left_out(key: str) -> str:
    """What a key that no output holds is, as the report counts it."""
    kind = "ema" if ".model_ema." in key else extra_kind(key)  # a VAE's own EMA too
    return {"ema": "ema weights", "loss": "training leftovers", "schedule": "training leftovers",
            "marker": "markers"}.get(kind, "unexplained keys")


def _kept_beside(name: str) -> bool:
    """Keys kept beside a component's own: ComfyUI's scaled-fp8 scales (one per weight, and
    a marker), without which the fp8 weights are wrong, and CLIP's position_ids, a buffer
    files hold or not."""
    return extra_kind(name) == "scaled-fp8" or name.endswith("position_ids")


def _count(left_out: dict[str, int], keys: Iterable[str]) -> None:
    for key in keys:
        why = _why_left_out(key)
        left_out[why] = left_out.get(why, 0) + 1


def _sort_out(keys: Mapping[str, str], names: Collection[str], left_out: dict[str, int]
              ) -> set[str]:
    """The keys (key -> its current name) that go into an output whose component has the
    keys ``names``; those that do not are counted into ``left_out`` by why."""
    kept = {k for k, name in keys.items() if name in names or _kept_beside(name)}
    _count(left_out, (name for k, name in keys.items() if k not in kept))
    return kept


def _architecture(fam: Family, component: str | None) -> str:
    arch = fam.architectures[0] if fam.architectures else fam.id
    if component is None or component == DIFFUSION_MODEL:
        return arch
    return f"{arch}/vae" if component == "vae" else f"{arch}/{component}"


_SPLIT_LAYOUTS = ("ldm", "kohya", "diffusers")


def _monolithic(path: str, checkpoint: Checkpoint) -> tuple[Family, Identification]:
    """The family and identification of a checkpoint whose components can be written apart:
    several components, or one under its checkpoint prefix, in the original, kohya or
    diffusers key names, of a family the weights or the metadata name."""
    ident = identify_checkpoint(checkpoint)
    lone_prefixed = len(ident.components) == 1 and ident.components[0].prefix
    if ident.kind == "checkpoint" or lone_prefixed:
        if ident.layout in _SPLIT_LAYOUTS and ident.family:
            return families()[ident.family], ident
        if ident.layout in _SPLIT_LAYOUTS and ident.compatible_families:
            raise UsageError(f"{path} is {a_or_an(ident.kind)} that fits "
                             f"{', '.join(ident.compatible_families)} and its metadata does "
                             "not say which; ckptkit cannot tell which family's it is")
    layout = f" in the {ident.layout} layout" if ident.layout else ""
    raise UsageError(f"{path} is {a_or_an(ident.kind)}{layout}, not a checkpoint in the original, "
                     "kohya or diffusers layout")


def _claimed(fam: Family, ident: Identification, keys: set[str], tiny: bool
             ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """The keys of each component of a monolithic checkpoint, and the checkpoint's keys that
    none of them has (leftovers, markers, EMA copies...) counted by why."""
    claimed, left_out, rest = {}, {}, set(keys)
    for found in ident.components:
        comp = fam.component(found.name)
        if ident.layout == "ldm":
            mine = current_names(comp, keys)
            table = set(comp.keys(layout="ldm")) | set(comp.keys(tiny=True, layout="ldm"))
        else:
            table = set(diffusers_layout.layout_table(fam, found.name, tiny, ident.layout))
            mine = {k: k for k in keys
                    if (k.startswith(found.prefix) if found.prefix else k in table)}
        rest -= set(mine)
        claimed[found.name] = _sort_out(mine, table, left_out)
    _count(left_out, rest)
    return claimed, left_out


def _to_standalone(fam: Family, comp, layout: str, prefix: str, keys: set[str], tiny: bool
                   ) -> tuple[list[Move], dict[str, str]]:
    """Moves from a checkpoint's ``keys`` of ``comp`` (under ``prefix`` in ``layout``) to its
    standalone names, and the keys left out for want of a place there (``to_canonical``)."""
    if layout == "ldm":
        return to_canonical(comp, keys)
    named = {k[len(prefix):]: k for k in keys}
    if layout == "kohya" and not diffusers_layout.kohya_renames(fam):
        return [Move(name, (key,)) for name, key in sorted(named.items())], {}
    moves = diffusers_layout.from_diffusers(fam, comp.name, tiny, set(named))
    return [replace(m, sources=tuple(named[s] for s in m.sources)) for m in moves], {}


def split(src: str, out_dir: str, components: list[str] | None = None,
          progress: Progress | None = None, hash_sources: bool = False,
          fsync: bool = True) -> SplitResult:
    """Writes the chosen components of ``src`` as standalone files; returns their paths, with
    what none of the components has (``left_out``). ``hash_sources``: compute the source's
    SHA-256 for their metadata (else: if known)."""
    written = SplitResult()
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(src))
        fam, ident = _monolithic(src, checkpoint)
        present = [c.name for c in ident.components]
        chosen = [component_name(c) for c in components] if components else present
        unknown = [c for c in chosen if c not in present]
        if unknown:
            raise UsageError(f"{src} has no {unknown[0]} component; it has "
                             f"{', '.join(present)}")
        stem = os.path.splitext(os.path.basename(src))[0]
        tiny = ident.components[0].size == "tiny"
        claimed, written.left_out = _claimed(fam, ident, set(checkpoint), tiny)
        prefixes = {c.name: c.prefix for c in ident.components}
        hashes = source_hashes([src], hash_sources)
        created: list[str] = []
        stack.callback(_remove_if_empty, created)  # after the batch: a failed split's folders
        batch = stack.enter_context(OutputBatch())
        for name in chosen:
            comp = fam.component(name)
            moves, dropped = _to_standalone(fam, comp, ident.layout, prefixes[name],
                                            claimed[name], tiny)
            scalars = {n: [checkpoint[k].scalar(), checkpoint[k].dtype.name]
                       for k, n in dropped.items()}
            kind = COMPONENT_KINDS[name]
            suffix = f"_{name}" if kind == "text-encoder" else ""
            folder = os.path.join(out_dir, FOLDERS[kind])
            _make_folder(folder, created)
            target = os.path.join(folder, f"{stem}{suffix}.safetensors")
            metadata = {**_inherited(checkpoint.metadata),
                        "modelspec.sai_model_spec": "1.0.1",
                        "modelspec.architecture": _architecture(fam, name),
                        "modelspec.title": json_text(f"{stem} {name}"),
                        **provenance("split", [src], hashes, family=fam.id,
                                    component=name)}
            if scalars:
                metadata[SCALARS_KEY] = json.dumps(scalars)
            absent = _absent_keys(comp, {m.target for m in moves}, tiny)
            if absent:
                # assemble takes back what split wrote: the part says what its source lacked
                metadata[ABSENT_KEY] = json.dumps(absent)
                written.warnings.append(
                    f"{src}: its {name} lacks {len(absent)} of the keys {fam.id} uses, e.g. "
                    f"{absent[0]}; {target} lacks them too (its {ABSENT_KEY} metadata lists "
                    "them, so that assemble takes it back)")
            write_safetensors(target, plan_moves(moves, checkpoint), metadata, inputs=(src,),
                              progress=progress, fsync=fsync, batch=batch)
            written.append(target)
    return written


def _part(path: str, stack: ExitStack) -> tuple[Checkpoint, Identification, str]:
    checkpoint = stack.enter_context(open_checkpoint(path))
    ident = identify_checkpoint(checkpoint)
    names = [c.name for c in ident.components]
    if len(names) != 1:
        raise UsageError(f"{path} is {a_or_an(ident.kind)}"
                         f"{' with ' + ', '.join(names) if names else ''}, not one component")
    return checkpoint, ident, names[0]


def _rebased(fam: Family, path: str, part: Checkpoint, ident: Identification, name: str
             ) -> tuple[Checkpoint, Identification]:
    """A component alone under another family's checkpoint prefix (FLUX keeps its VAE under
    ``vae.``, SD3 under ``first_stage_model.``) seen under its standalone names, as the
    ComfyUI file it would split into; any other part as it is. Only a plain rename: a text
    encoder in open_clip's naming under another prefix is refused with what to do."""
    found = ident.components[0] if len(ident.components) == 1 else None
    if (ident.layout != "ldm" or found is None or name not in fam.component_names
            or found.prefix == fam.component(name).ldm_prefix):
        return part, ident
    own = families()[ident.family or ident.compatible_families[0]].component(name) \
        if ident.family or ident.compatible_families else None
    if own is None or own.ldm_naming == "openclip":
        raise UsageError(f"{path} holds a {name} under {found.prefix!r}, where "
                         f"{fam.name} keeps it under {fam.component(name).ldm_prefix!r}: "
                         "split it out first (ckpt split) and give the standalone file")
    inner = own.ldm_prefix + "transformer." if own.ldm_naming == "transformer" \
        else own.ldm_prefix
    names = current_names(own, part)
    tensors = {names[k][len(inner):]: part[k] for k in names if names[k].startswith(inner)}
    return replace(part, tensors=tensors), replace(ident, layout="comfyui")


def _other_family_warning(fam: Family, path: str, part: Checkpoint, name: str
                          ) -> list[str]:
    """A warning when a VAE that fits ``fam`` by its shapes is named another family's by its
    metadata: SD 1.x and SDXL VAEs (as SD3's and FLUX's) have the same keys and shapes but
    not the same weights; the latents one makes are not what the other's model expects.
    (SDXL's refiner ships the base's VAE.)"""
    named = named_family(part.metadata)
    if name != "vae" or named is None or _same_vae(named[0].id, fam.id):
        return []
    return [f"{path}: {named[1]} names {named[0].id}, not {fam.id}: this VAE has the keys and "
            f"shapes of {fam.id}'s but was trained for another model's latents; make sure it "
            "is the one you mean"]


def _same_vae(a: str, b: str) -> bool:
    return a == b or {a, b} <= set(SDXL_VAE_FAMILIES)


def _moves_for(part: Checkpoint, keys: set[str], ident: Identification, fam: Family, comp,
               tiny: bool) -> list[Move]:
    """A part's ``keys`` under the family's monolithic names, whatever layout it came in."""
    if ident.layout == "ldm":
        names = current_names(comp, keys)
        return [Move(names[k], (k,)) for k in sorted(names, key=names.__getitem__)]
    scalars = {n: v[0] for n, v in _scalars(part).items()}
    if ident.layout == "comfyui":
        names = standalone_current_names(comp, keys)
        source = {v: k for k, v in names.items()}
        return [replace(m, sources=tuple(source[s] for s in m.sources))
                for m in to_ldm(comp, set(names.values()), scalars)]
    renamed = ident.layout == "diffusers" or diffusers_layout.kohya_renames(fam)
    prefix = ("" if ident.layout == "diffusers" else
              diffusers_layout.kohya_prefix(fam, comp.name) if renamed else comp.kohya_prefix)
    named = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if not renamed:  # kohya's SDXL: its prefix before the canonical names
        return [replace(m, sources=tuple(named[s] for s in m.sources))
                for m in to_ldm(comp, set(named), scalars)]
    to_canonical_names = diffusers_layout.from_diffusers(fam, comp.name, tiny, set(named))
    canonical = {m.target: replace(m, sources=tuple(named[s] for s in m.sources))
                 for m in to_canonical_names}
    return [_compose(canonical, m) for m in to_ldm(comp, set(canonical), scalars)]


def _compose(first: dict[str, Move], second: Move) -> Move:
    """``second`` (from canonical names) applied after ``first`` (to canonical names): one
    of the two renames only, since no family reshapes a tensor on both legs."""
    if second.op == "scalar":
        return second
    if second.op == "copy":
        return replace(first[second.sources[0]], target=second.target)
    inner = [first[s] for s in second.sources]
    if any(m.op != "copy" for m in inner):
        raise AssertionError(f"{second.target}: two reshaping moves in a row")
    return replace(second, sources=tuple(m.sources[0] for m in inner))


def _scalar_dtypes(part: Checkpoint, comp) -> dict[str, Any]:
    return {comp.ldm_prefix + n: BY_NAME[v[1]] for n, v in _scalars(part).items()}


def _scalars(part: Checkpoint) -> dict[str, list]:
    """The scalars a split part records (``SCALARS_KEY``: name -> [value, dtype]); a value
    that is not what split writes is the file's error, not a crash."""
    try:
        found = json.loads(part.metadata.get(SCALARS_KEY, "{}"))
        if isinstance(found, dict) and all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], int | float)
                and v[1] in BY_NAME for v in found.values()):
            return found
    except (ValueError, RecursionError):
        pass
    raise FormatError(f"its {SCALARS_KEY} metadata is not what ckptkit's split writes "
                      "(name: [number, dtype])", part.path)


def _make_folder(folder: str, created: list[str]) -> None:
    """``os.makedirs``, noting in ``created`` the folders it made (outermost first)."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    created.extend(reversed(missing))


def _remove_if_empty(created: list[str]) -> None:
    """Removes the folders a split made that hold nothing (it failed before writing there),
    innermost first; folders that hold its files stay."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _absent_keys(comp, written: Collection[str], tiny: bool) -> list[str]:
    """The standalone keys of ``comp`` that a part holding ``written`` lacks, but for those
    files may hold or not (``Component.optional``)."""
    return [k for k in comp.keys(tiny=tiny) if k not in written and not comp.optional(k)]


def _recorded_absent(part: Checkpoint) -> set[str]:
    """The keys a split part says its source lacked (``ABSENT_KEY``); a value that is not
    what split writes is the file's error, not a crash."""
    try:
        found = json.loads(part.metadata.get(ABSENT_KEY, "[]"))
        if isinstance(found, list) and all(isinstance(k, str) for k in found):
            return set(found)
    except (ValueError, RecursionError):
        pass
    raise FormatError(f"its {ABSENT_KEY} metadata is not what ckptkit's split writes "
                      "(a list of key names)", part.path)


def _refuse_incomplete(fam: Family, path: str, name: str, expected: KeyTable,
                       present: Collection[str], excused: Collection[str] = ()
                       ) -> list[str]:
    """Refuses a part that lacks keys of ``expected`` (in its own layout) that ``fam``'s
    component needs (a shape check cannot see what is not there), unless ``excused``: the
    keys a split part says its source lacked, so that what split writes assemble takes
    back. Returns a warning for those."""
    comp = fam.component(name)
    missing = [k for k in expected if k not in present and not comp.optional(k)]
    unexcused = [k for k in missing if k not in excused]
    if unexcused:
        raise UsageError(f"{path} is an incomplete {name}: it lacks {len(unexcused)} of the "
                         f"{len(expected)} keys of {fam.name}'s {name}, e.g. {unexcused[0]}")
    if not missing:
        return []
    return [f"{path} lacks {len(missing)} of the keys of {fam.id}'s {name}, e.g. "
            f"{missing[0]}, as the checkpoint it was split from did; the output lacks them too"]


def _part_names(fam: Family, ident: Identification, name: str, part: Checkpoint
                ) -> dict[str, str]:
    """The part's keys -> their names in current files (an older SD1 text encoder in the
    original layout gains its ``text_model.`` level)."""
    names = {k: k for k in part}
    if ident.layout == "ldm":
        names.update(current_names(fam.component(name), part))
    elif ident.layout == "comfyui":
        names.update(standalone_current_names(fam.component(name), names))
    return names


def _check_fits(fam: Family, path: str, ident: Identification, name: str,
                part: Checkpoint, tiny: bool) -> list[str]:
    """Refuses a part that does not fit ``fam``: a component it does not use, another
    layout, other shapes, keys missing; returns the warnings for what it takes anyway."""
    if name not in fam.component_names:
        wanted = ", ".join(c for c in fam.component_names if c != DIFFUSION_MODEL)
        raise UsageError(f"{path} is {a_or_an(name)}, which {fam.name} does not use (it takes "
                         f"{wanted})")
    if ident.layout not in ("ldm", "comfyui", "kohya", "diffusers"):
        raise UsageError(f"{path} is in the {ident.layout} layout; parts are taken in the "
                         "ComfyUI, kohya, diffusers or original layouts")
    expected = diffusers_layout.layout_table(fam, name, tiny, ident.layout)
    present = {v: k for k, v in _part_names(fam, ident, name, part).items()}
    if name != DIFFUSION_MODEL:  # whose variants (inpainting...) have shapes of their own
        wrong = [k for k, shape in expected.items() if k in present and
                 part[present[k]].shape != shape]
        if wrong:
            key = wrong[0]
            raise UsageError(f"{path} does not fit {fam.name}: {key} is "
                             f"{list(part[present[key]].shape)}, the model needs "
                             f"{list(expected[key])}"
                             + _mismatch_hint(ident, name, tiny))
    excused = _recorded_absent(part) if ident.layout == "comfyui" else set()
    return _refuse_incomplete(fam, path, name, expected, present, excused)


def _mismatch_hint(ident: Identification, name: str, tiny: bool) -> str:
    """The likely cause of a part's odd shapes: a tiny test part with a full-size model (or
    the reverse), else for a VAE its latent channels."""
    size = ident.components[0].size if ident.components else "other"
    if size in ("tiny", "full") and (size == "tiny") != tiny:
        named = {True: "tiny", False: "full-size"}
        return f" (a {named[size == 'tiny']} part for a {named[tiny]} model)"
    return " (a 16-channel VAE for a 4-channel model, or the other way)" if name == "vae" else ""


def assemble(diffusion_model: str, text_encoders: list[str], vae: str | None, out: str, *,
             allow_partial: bool = False, progress: Progress | None = None,
             hash_sources: bool = False, fsync: bool = True) -> dict[str, Any]:
    """Writes the parts as one monolithic checkpoint in the family's original layout; says
    what it holds, which components are missing, and what of each part it left out."""
    paths = [diffusion_model, *text_encoders, *([vae] if vae else [])]
    with ExitStack() as stack:
        parts = [(p, *_part(p, stack)) for p in paths]
        _, _, model_ident, model_name = parts[0]
        if model_name != DIFFUSION_MODEL or not model_ident.family:
            raise UsageError(f"{diffusion_model} is {a_or_an(model_ident.kind)}, not a "
                             "diffusion model of a known family")
        fam = families()[model_ident.family]
        tiny = model_ident.components[0].size == "tiny"
        seen: dict[str, str] = {}
        warnings: list[str] = []
        for i, (path, part, ident, name) in enumerate(parts[1:], 1):
            if vae and path == vae and name != "vae":
                raise UsageError(f"{path} was given as the VAE but is {a_or_an(name)}")
            if name in seen:
                raise UsageError(f"{path} and {seen[name]} are both {a_or_an(name)}")
            seen[name] = path
            part, ident = _rebased(fam, path, part, ident, name)
            parts[i] = (path, part, ident, name)
            warnings += _check_fits(fam, path, ident, name, part, tiny)
            warnings += _other_family_warning(fam, path, part, name)
        missing = [c for c in fam.component_names if c != DIFFUSION_MODEL and c not in seen]
        if missing and not allow_partial:
            raise UsageError(f"{fam.name} also needs {', '.join(missing)}; give them, or "
                             "--allow-partial for a checkpoint without them")
        warnings += _check_fits(fam, diffusion_model, model_ident, model_name, parts[0][1],
                                tiny)
        planned, left_out = [], {}
        for path, part, ident, name in parts:
            left: dict[str, int] = {}
            planned += _planned_part(part, ident, fam, name, tiny, left)
            if left:
                left_out[path] = left
        metadata = {**_inherited(parts[0][1].metadata), "modelspec.sai_model_spec": "1.0.1",
                    "modelspec.architecture": _architecture(fam, None),
                    "modelspec.title": json_text(os.path.splitext(os.path.basename(out))[0]),
                    **provenance("assemble", paths, source_hashes(paths, hash_sources),
                                 family=fam.id, components=[p[3] for p in parts])}
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                          fsync=fsync)
    return {"family": fam.id, "components": [p[3] for p in parts], "missing": missing,
            "tensors": len(planned), "left_out": left_out, "warnings": warnings}


def _planned_part(part: Checkpoint, ident: Identification, fam: Family, name: str,
                  tiny: bool, left_out: dict[str, int]) -> list[Planned]:
    """A part's tensors planned under the family's monolithic names; its keys left out are
    counted by why into ``left_out``."""
    comp = fam.component(name)
    expected = diffusers_layout.layout_table(fam, name, tiny, ident.layout)
    keys = _sort_out(_part_names(fam, ident, name, part), expected, left_out)
    moves = _moves_for(part, keys, ident, fam, comp, tiny)
    return plan_moves(moves, part, _scalar_dtypes(part, comp))


def component_from(fam: Family, path: str, checkpoint: Checkpoint, name: str, tiny: bool,
                   ident: Identification | None = None,
                   left_out: dict[str, int] | None = None,
                   warnings: list[str] | None = None) -> list[Planned]:
    """Component ``name`` of ``fam`` under its monolithic names, from a file that holds it
    alone (any supported layout) or from a monolithic checkpoint of the same family: what
    ``vae bake`` and ``merge --take`` put into a checkpoint, checked to fit first. ``ident``:
    the file's identification where the caller has it already; ``left_out``: counts (by why)
    of the file's keys not taken are added to it; ``warnings``: what the user should check
    (a VAE its metadata calls another family's) is added to it."""
    ident = ident or identify_checkpoint(checkpoint)
    left_out = {} if left_out is None else left_out
    comp = fam.component(name) if name in fam.component_names else None
    if ident.kind == "checkpoint" and comp is not None:
        if (ident.family, ident.layout) != (fam.id, "ldm"):
            raise UsageError(f"{path} is {a_or_an(ident.family or 'unknown')} checkpoint in the "
                             f"{ident.layout} layout; a {name} for {fam.name} must come from "
                             f"one of the same family in the original layout, or alone")
        if name not in [c.name for c in ident.components]:
            raise UsageError(f"{path} has no {name}")
        expected = comp.keys(tiny=tiny, layout="ldm")
        names = current_names(comp, checkpoint)
        _refuse_incomplete(fam, path, name, expected, set(names.values()))
        kept = _sort_out(names, expected, left_out)
        return plan_moves(sorted((Move(names[k], (k,)) for k in kept), key=lambda m: m.target),
                          checkpoint)
    names = [c.name for c in ident.components]
    if names != [name]:
        raise UsageError(f"{path} is {a_or_an(ident.kind)}"
                         f"{' with ' + ', '.join(names) if names else ''}, not a {name}")
    checkpoint, ident = _rebased(fam, path, checkpoint, ident, name)
    found = _check_fits(fam, path, ident, name, checkpoint, tiny)
    if warnings is not None:
        warnings += found + _other_family_warning(fam, path, checkpoint, name)
    return _planned_part(checkpoint, ident, fam, name, tiny, left_out)


def canonical_moves(fam: Family, path: str, checkpoint: Checkpoint, ident: Identification,
                    name: str, tiny: bool, warnings: list[str]) -> tuple[Checkpoint, list[Move]]:
    """Moves from the keys of ``checkpoint`` that hold component ``name`` of ``fam`` to its
    standalone (canonical) names, checked first as ``assemble`` checks a part: a file that
    holds the component alone (any layout; under another family's prefix it is rebased, as
    for assemble), or a checkpoint of ``fam`` whose other components are left aside. Returns
    the checkpoint the moves read (a rebased part's view) and the moves; what the user should
    check (a VAE its metadata calls another family's) is added to ``warnings``. Reads no
    tensor data."""
    comp = fam.component(name)
    if ident.kind == "checkpoint":
        if ident.family != fam.id:
            raise UsageError(f"{path} is {a_or_an(ident.describe())}; a {name} for {fam.name} "
                             "must come from one of the same family, or alone")
        if name not in [c.name for c in ident.components]:
            raise UsageError(f"{path} has no {name}")
        keys = _claimed(fam, ident, set(checkpoint), tiny)[0][name]
        present = set(current_names(comp, keys).values()) if ident.layout == "ldm" else keys
        expected = (comp.keys(tiny=tiny, layout="ldm") if ident.layout == "ldm" else
                    diffusers_layout.layout_table(fam, name, tiny, ident.layout))
        _refuse_incomplete(fam, path, name, expected, present)
    else:
        names = [c.name for c in ident.components]
        if names != [name]:
            raise UsageError(f"{path} is {a_or_an(ident.kind)}"
                             f"{' with ' + ', '.join(names) if names else ''}, not a {name}")
        checkpoint, ident = _rebased(fam, path, checkpoint, ident, name)
        warnings += _check_fits(fam, path, ident, name, checkpoint, tiny)
        warnings += _other_family_warning(fam, path, checkpoint, name)
        expected = diffusers_layout.layout_table(fam, name, tiny, ident.layout)
        keys = _sort_out(_part_names(fam, ident, name, checkpoint), expected, {})
    if ident.layout == "comfyui":
        current = standalone_current_names(comp, keys)
        return checkpoint, [Move(current[k], (k,)) for k in sorted(keys, key=current.get)]
    prefix = next(c.prefix for c in ident.components if c.name == name)
    return checkpoint, _to_standalone(fam, comp, ident.layout, prefix, keys, tiny)[0]


def bake_vae(src: str, vae: str, out: str, progress: Progress | None = None,
             hash_sources: bool = False, fsync: bool = True) -> dict[str, Any]:
    """``src`` with its VAE replaced by ``vae`` (a VAE file in any supported layout, or
    another checkpoint of the family): any VAE with the keys and shapes the family's needs
    (its latent channels among them) is taken, with a warning when its metadata names
    another family; refused across latent widths or when incomplete. Says how many tensors
    were replaced, what of ``vae`` was left out, and the warnings."""
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(src))
        fam, ident = _monolithic(src, checkpoint)
        if ident.layout != "ldm":
            raise UsageError(f"{src} is in the {ident.layout} layout; vae bake writes the "
                             "original layout: split it and assemble the parts first")
        part = stack.enter_context(open_checkpoint(vae))
        tiny = ident.components[0].size == "tiny"
        left_out: dict[str, int] = {}
        warnings: list[str] = []
        taken = component_from(fam, vae, part, "vae", tiny, left_out=left_out,
                               warnings=warnings)
        comp = fam.component("vae")
        old = {k for k in checkpoint if k.startswith(comp.ldm_prefix)}
        moves = [Move(k, (k,)) for k in checkpoint if k not in old]
        planned = plan_moves(moves, checkpoint) + taken
        metadata = {**_inherited(checkpoint.metadata),
                    **provenance("vae bake", [src, vae],
                                 source_hashes([src, vae], hash_sources), family=fam.id)}
        write_safetensors(out, planned, metadata, inputs=(src, vae), progress=progress,
                          fsync=fsync)
    return {"family": fam.id, "replaced": len(old), "tensors": len(planned),
            "left_out": left_out, "warnings": warnings}
