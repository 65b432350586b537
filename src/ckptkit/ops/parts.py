"""``split``, ``assemble`` and ``vae bake``: monolithic checkpoints and their parts.

A split writes each component of a monolithic checkpoint as a ComfyUI standalone file
(``diffusion_models/``, ``text_encoders/``, ``vae/``), renamed by ``arch.layouts``. An
assemble identifies each part from its header, checks that the parts belong together
(the family's text encoders, a VAE with the latent channels its diffusion model makes, the
same size), and writes them under the family's monolithic prefixes. Scalars that a
standalone file has no place for (open_clip's ``logit_scale``) travel in the part's
metadata, so split then assemble gives back the same tensors bit for bit. Every output
says where it came from in its metadata, merged into the source's less what describes that
file and not the output (its SHA-256, which part it is).

Only a component's own keys go into an output: EMA copies, training leftovers (a VAE's
``loss.*`` discriminator, as A1111's VAE loader ignores them), marker keys and keys no
component has are left out and counted by why; a part that lacks keys its component needs
is refused before anything is written.
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
from ..arch.detect import Identification, extra_kind
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
from ..errors import FormatError, UsageError
from ..formats import Checkpoint, open_checkpoint
from ..formats.dtypes import BY_NAME
from .inspect import identify_checkpoint
from .provenance import provenance, source_hashes

SCALARS_KEY = "ckptkit.scalars"  # JSON: {name: [value, dtype]} of keys a part cannot hold
FOLDERS = {"diffusion-model": "diffusion_models", "text-encoder": "text_encoders",
           "vae": "vae"}
# Metadata that describes the file it is in, not an output made from it: hashes of its bytes
# (ModelSpec's, kohya's), which part it is, the scalars only a part holds.
_OWN_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash",
                 "ckptkit.component", "ckptkit.components", SCALARS_KEY)


class SplitResult(list):
    """The paths ``split`` wrote (a list of them, as it always returned) and ``left_out``:
    the source's keys that none of its components has, counted by why."""

    def __init__(self, paths: Iterable[str] = (), left_out: dict[str, int] | None = None):
        super().__init__(paths)
        self.left_out = left_out or {}


def _inherited(metadata: Mapping[str, str]) -> dict[str, str]:
    """A source's metadata less what is true of that file only (``_OWN_METADATA``)."""
    return {k: v for k, v in metadata.items() if k not in _OWN_METADATA}


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


def _monolithic(path: str, checkpoint: Checkpoint) -> tuple[Family, Identification]:
    ident = identify_checkpoint(checkpoint)
    if ident.kind != "checkpoint" or ident.layout != "ldm" or not ident.family:
        raise UsageError(f"{path} is a {ident.kind}"
                         f"{' in the ' + ident.layout + ' layout' if ident.layout else ''}, "
                         "not a monolithic checkpoint in the original layout")
    return families()[ident.family], ident


def _claimed(fam: Family, names: list[str], keys: set[str]
             ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """The keys of each component ``names`` of a monolithic checkpoint, and the checkpoint's
    keys that none of them has (leftovers, markers, EMA copies...) counted by why."""
    claimed, left_out, rest = {}, {}, set(keys)
    for name in names:
        comp = fam.component(name)
        mine = current_names(comp, keys)
        rest -= set(mine)
        table = set(comp.keys(layout="ldm")) | set(comp.keys(tiny=True, layout="ldm"))
        claimed[name] = _sort_out(mine, table, left_out)
    _count(left_out, rest)
    return claimed, left_out


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
        claimed, written.left_out = _claimed(fam, present, set(checkpoint))
        hashes = source_hashes([src], hash_sources)
        created: list[str] = []
        stack.callback(_remove_if_empty, created)  # after the batch: a failed split's folders
        batch = stack.enter_context(OutputBatch())
        for name in chosen:
            comp = fam.component(name)
            moves, dropped = to_canonical(comp, claimed[name])
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
                        "modelspec.title": f"{stem} {name}",
                        **provenance("split", [src], hashes, family=fam.id,
                                    component=name)}
            if scalars:
                metadata[SCALARS_KEY] = json.dumps(scalars)
            write_safetensors(target, plan_moves(moves, checkpoint), metadata, inputs=(src,),
                              progress=progress, fsync=fsync, batch=batch)
            written.append(target)
    return written


def _part(path: str, stack: ExitStack) -> tuple[Checkpoint, Identification, str]:
    checkpoint = stack.enter_context(open_checkpoint(path))
    ident = identify_checkpoint(checkpoint)
    names = [c.name for c in ident.components]
    if len(names) != 1:
        raise UsageError(f"{path} is a {ident.kind}"
                         f"{' with ' + ', '.join(names) if names else ''}, not one component")
    return checkpoint, ident, names[0]


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


def _optional(name: str, key: str) -> bool:
    """Keys of a component that files hold or not: CLIP's position_ids (a buffer transformers
    stopped saving), open_clip's and ComfyUI's logit_scale (recreated from a split's scalars,
    unused by diffusion), and CLIP-L's text_projection, which many CLIP-L files lack and
    ComfyUI loads without (Comfy-Org/ComfyUI#5222)."""
    return key.endswith(("position_ids", "logit_scale")) or (
        name == "clip_l" and key.endswith("text_projection.weight"))


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


def _refuse_incomplete(fam: Family, path: str, name: str, expected: KeyTable,
                       present: Collection[str]) -> None:
    """Refuses a part that lacks keys of ``expected`` (in its own layout) that ``fam``'s
    component needs: a shape check cannot see what is not there."""
    missing = [k for k in expected if k not in present and not _optional(name, k)]
    if missing:
        raise UsageError(f"{path} is an incomplete {name}: it lacks {len(missing)} of the "
                         f"{len(expected)} keys of {fam.name}'s {name}, e.g. {missing[0]}")


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
                part: Checkpoint, tiny: bool) -> None:
    if name not in fam.component_names:
        wanted = ", ".join(c for c in fam.component_names if c != DIFFUSION_MODEL)
        raise UsageError(f"{path} is a {name}, which {fam.name} does not use (it takes "
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
    _refuse_incomplete(fam, path, name, expected, present)


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
            raise UsageError(f"{diffusion_model} is a {model_ident.kind}, not a diffusion model "
                             "of a known family")
        fam = families()[model_ident.family]
        tiny = model_ident.components[0].size == "tiny"
        seen: dict[str, str] = {}
        for path, part, ident, name in parts[1:]:
            if vae and path == vae and name != "vae":
                raise UsageError(f"{path} was given as the VAE but is a {name}")
            if name in seen:
                raise UsageError(f"{path} and {seen[name]} are both a {name}")
            seen[name] = path
            _check_fits(fam, path, ident, name, part, tiny)
        missing = [c for c in fam.component_names if c != DIFFUSION_MODEL and c not in seen]
        if missing and not allow_partial:
            raise UsageError(f"{fam.name} also needs {', '.join(missing)}; give them, or "
                             "--allow-partial for a checkpoint without them")
        _check_fits(fam, diffusion_model, model_ident, model_name, parts[0][1], tiny)
        planned, left_out = [], {}
        for path, part, ident, name in parts:
            left: dict[str, int] = {}
            planned += _planned_part(part, ident, fam, name, tiny, left)
            if left:
                left_out[path] = left
        metadata = {**_inherited(parts[0][1].metadata), "modelspec.sai_model_spec": "1.0.1",
                    "modelspec.architecture": _architecture(fam, None),
                    "modelspec.title": os.path.splitext(os.path.basename(out))[0],
                    **provenance("assemble", paths, source_hashes(paths, hash_sources),
                                 family=fam.id, components=[p[3] for p in parts])}
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                          fsync=fsync)
    return {"family": fam.id, "components": [p[3] for p in parts], "missing": missing,
            "tensors": len(planned), "left_out": left_out}


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
                   left_out: dict[str, int] | None = None) -> list[Planned]:
    """Component ``name`` of ``fam`` under its monolithic names, from a file that holds it
    alone (any supported layout) or from a monolithic checkpoint of the same family: what
    ``vae bake`` and ``merge --take`` put into a checkpoint, checked to fit first. ``ident``:
    the file's identification where the caller has it already; ``left_out``: counts (by why)
    of the file's keys not taken are added to it."""
    ident = ident or identify_checkpoint(checkpoint)
    left_out = {} if left_out is None else left_out
    comp = fam.component(name) if name in fam.component_names else None
    if ident.kind == "checkpoint" and comp is not None:
        if (ident.family, ident.layout) != (fam.id, "ldm"):
            raise UsageError(f"{path} is a {ident.family or 'unknown'} checkpoint in the "
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
        raise UsageError(f"{path} is a {ident.kind}"
                         f"{' with ' + ', '.join(names) if names else ''}, not a {name}")
    _check_fits(fam, path, ident, name, checkpoint, tiny)
    return _planned_part(checkpoint, ident, fam, name, tiny, left_out)


def bake_vae(src: str, vae: str, out: str, progress: Progress | None = None,
             hash_sources: bool = False, fsync: bool = True) -> dict[str, Any]:
    """``src`` with its VAE replaced by ``vae`` (a VAE file in any supported layout, or
    another checkpoint of the family), refused across latent widths or when incomplete; says
    how many tensors were replaced and what of ``vae`` was left out."""
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(src))
        fam, ident = _monolithic(src, checkpoint)
        part = stack.enter_context(open_checkpoint(vae))
        tiny = ident.components[0].size == "tiny"
        left_out: dict[str, int] = {}
        taken = component_from(fam, vae, part, "vae", tiny, left_out=left_out)
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
            "left_out": left_out}
