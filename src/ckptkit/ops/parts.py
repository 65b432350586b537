"""``split``, ``assemble`` and ``vae bake``: monolithic checkpoints and their parts.

A split writes each component of a monolithic checkpoint as a ComfyUI standalone file
(``diffusion_models/``, ``text_encoders/``, ``vae/``), renamed by ``arch.layouts``. An
assemble identifies each part from its header, checks that the parts belong together
(the family's text encoders, a VAE with the latent channels its diffusion model makes, the
same size), and writes them under the family's monolithic prefixes. Scalars that a
standalone file has no place for (open_clip's ``logit_scale``) travel in the part's
metadata, so split then assemble gives back the same tensors bit for bit. Every output
says where it came from in its metadata, merged into the source's.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from ..arch import diffusers_layout
from ..arch.detect import Identification
from ..arch.families import COMPONENT_KINDS, DIFFUSION_MODEL, Family, families
from ..arch.layouts import Move, to_canonical, to_ldm
from ..engine.moves import plan_moves
from ..engine.writer import OutputBatch, Planned, Progress, write_safetensors
from ..errors import UsageError
from ..formats import Checkpoint, open_checkpoint
from ..formats.dtypes import BY_NAME
from .inspect import identify_checkpoint
from .provenance import provenance, source_hashes

SCALARS_KEY = "ckptkit.scalars"  # JSON: {name: [value, dtype]} of keys a part cannot hold
FOLDERS = {"diffusion-model": "diffusion_models", "text-encoder": "text_encoders",
           "vae": "vae"}


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


def split(src: str, out_dir: str, components: list[str] | None = None,
          progress: Progress | None = None, hash_sources: bool = False,
          fsync: bool = True) -> list[str]:
    """Writes the chosen components of ``src`` as standalone files; returns their paths.
    ``hash_sources``: compute the source's SHA-256 for their metadata (else: if known)."""
    written = []
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(src))
        fam, ident = _monolithic(src, checkpoint)
        present = [c.name for c in ident.components]
        chosen = components or present
        unknown = [c for c in chosen if c not in present]
        if unknown:
            raise UsageError(f"{src} has no {unknown[0]} component; it has "
                             f"{', '.join(present)}")
        stem = os.path.splitext(os.path.basename(src))[0]
        keys = set(checkpoint)
        hashes = source_hashes([src], hash_sources)
        batch = stack.enter_context(OutputBatch())
        for name in chosen:
            comp = fam.component(name)
            moves, dropped = to_canonical(comp, keys)
            scalars = {n: [checkpoint[k].scalar(), checkpoint[k].dtype.name]
                       for k, n in dropped.items()}
            kind = COMPONENT_KINDS[name]
            suffix = f"_{name}" if kind == "text-encoder" else ""
            folder = os.path.join(out_dir, FOLDERS[kind])
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, f"{stem}{suffix}.safetensors")
            metadata = {**checkpoint.metadata,
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


def _moves_for(part: Checkpoint, ident: Identification, fam: Family, comp, tiny: bool
               ) -> list[Move]:
    """A part's keys under the family's monolithic names, whatever layout it came in."""
    keys = set(part)
    if ident.layout == "ldm":
        return [Move(k, (k,)) for k in sorted(keys) if k.startswith(comp.ldm_prefix)]
    scalars = {n: v[0] for n, v in json.loads(part.metadata.get(SCALARS_KEY, "{}")).items()}
    if ident.layout == "comfyui":
        return to_ldm(comp, keys, scalars)
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
    scalars = json.loads(part.metadata.get(SCALARS_KEY, "{}"))
    return {comp.ldm_prefix + n: BY_NAME[v[1]] for n, v in scalars.items()}


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
    wrong = [k for k, shape in expected.items() if k in part and part[k].shape != shape]
    if wrong:
        key = wrong[0]
        raise UsageError(f"{path} does not fit {fam.name}: {key} is {list(part[key].shape)}, "
                         f"the model needs {list(expected[key])}"
                         + (" (a 16-channel VAE for a 4-channel model, or the other way)"
                            if name == "vae" else ""))


def assemble(diffusion_model: str, text_encoders: list[str], vae: str | None, out: str, *,
             allow_partial: bool = False, progress: Progress | None = None,
             hash_sources: bool = False, fsync: bool = True) -> dict[str, Any]:
    """Writes the parts as one monolithic checkpoint in the family's original layout."""
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
        planned = []
        for _path, part, ident, name in parts:
            planned += _planned_part(part, ident, fam, name, tiny)
        base = dict(parts[0][1].metadata)
        base.pop(SCALARS_KEY, None)
        metadata = {**base, "modelspec.sai_model_spec": "1.0.1",
                    "modelspec.architecture": _architecture(fam, None),
                    **provenance("assemble", paths, source_hashes(paths, hash_sources),
                                 family=fam.id, components=[p[3] for p in parts])}
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                          fsync=fsync)
    return {"family": fam.id, "components": [p[3] for p in parts], "missing": missing,
            "tensors": len(planned)}


def _planned_part(part: Checkpoint, ident: Identification, fam: Family, name: str,
                  tiny: bool) -> list[Planned]:
    """A part's tensors planned under the family's monolithic names."""
    comp = fam.component(name)
    return plan_moves(_moves_for(part, ident, fam, comp, tiny), part, _scalar_dtypes(part, comp))


def component_from(fam: Family, path: str, checkpoint: Checkpoint, name: str, tiny: bool,
                   ident: Identification | None = None) -> list[Planned]:
    """Component ``name`` of ``fam`` under its monolithic names, from a file that holds it
    alone (any supported layout) or from a monolithic checkpoint of the same family: what
    ``vae bake`` and ``merge --take`` put into a checkpoint, checked to fit first. ``ident``:
    the file's identification where the caller has it already."""
    ident = ident or identify_checkpoint(checkpoint)
    comp = fam.component(name) if name in fam.component_names else None
    if ident.kind == "checkpoint" and comp is not None:
        if (ident.family, ident.layout) != (fam.id, "ldm"):
            raise UsageError(f"{path} is a {ident.family or 'unknown'} checkpoint in the "
                             f"{ident.layout} layout; a {name} for {fam.name} must come from "
                             f"one of the same family in the original layout, or alone")
        if name not in [c.name for c in ident.components]:
            raise UsageError(f"{path} has no {name}")
        moves = [Move(k, (k,)) for k in checkpoint if k.startswith(comp.ldm_prefix)]
        return plan_moves(moves, checkpoint)
    names = [c.name for c in ident.components]
    if names != [name]:
        raise UsageError(f"{path} is a {ident.kind}"
                         f"{' with ' + ', '.join(names) if names else ''}, not a {name}")
    _check_fits(fam, path, ident, name, checkpoint, tiny)
    return _planned_part(checkpoint, ident, fam, name, tiny)


def bake_vae(src: str, vae: str, out: str, progress: Progress | None = None,
             hash_sources: bool = False, fsync: bool = True) -> dict[str, Any]:
    """``src`` with its VAE replaced by ``vae`` (a VAE file in any supported layout, or
    another checkpoint of the family), refused across latent widths."""
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(src))
        fam, ident = _monolithic(src, checkpoint)
        part = stack.enter_context(open_checkpoint(vae))
        tiny = ident.components[0].size == "tiny"
        taken = component_from(fam, vae, part, "vae", tiny)
        comp = fam.component("vae")
        old = {k for k in checkpoint if k.startswith(comp.ldm_prefix)}
        moves = [Move(k, (k,)) for k in checkpoint if k not in old]
        planned = plan_moves(moves, checkpoint) + taken
        metadata = {**checkpoint.metadata,
                    **provenance("vae bake", [src, vae],
                                 source_hashes([src, vae], hash_sources), family=fam.id)}
        write_safetensors(out, planned, metadata, inputs=(src, vae), progress=progress,
                          fsync=fsync)
    return {"family": fam.id, "replaced": len(old), "tensors": len(planned)}
