"""``prune``: a training checkpoint made into the file people load: EMA weights dropped (or
swapped in), training leftovers removed, floating tensors cast, components dropped.

Casting follows what loaders expect: integer tensors (CLIP ``position_ids``) and marker keys
(``v_pred``) are never touched; values beyond the target's range are clamped to its largest
finite value and counted instead of becoming infinities; SDXL's VAE keeps its precision
unless ``vae_dtype`` says otherwise, because it overflows in fp16 (black images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..arch.detect import MARKERS, Identification, extra_kind
from ..arch.families import component_name
from ..engine.moves import copy_range
from ..engine.slices import by_rows, may_exceed
from ..engine.writer import Planned, Progress, write_safetensors
from ..errors import UsageError
from ..formats import LazyTensor, open_checkpoint
from ..formats.dtypes import CLI_NAMES, DType
from .inspect import identify_checkpoint
from .provenance import inherited, provenance, source_hashes

# Largest finite value of each narrow float type: beyond it a cast gives inf (fp16) or NaN.
LIMITS = {"F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}
EMA_PREFIX = "model_ema."
# Families whose checkpoints hold SDXL's VAE (the refiner has the same one), which overflows
# in fp16 (black images): kept in its precision unless --vae-dtype says otherwise.
SDXL_VAE_FAMILIES = ("sdxl", "sdxl-refiner")
_DIFFUSION_PREFIX = "model.diffusion_model."


@dataclass
class PruneReport:
    family: str | None
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    cast: int = 0
    clamped: dict[str, int] = field(default_factory=dict)
    ema: str = "none"
    notes: list[str] = field(default_factory=list)


def clamped_cast(tensor: LazyTensor, target: DType, key: str, clamped: dict[str, int]):
    """The tensor cast to ``target`` a slice at a time, values beyond its range clamped and
    counted in ``clamped`` under ``key``."""
    limit = LIMITS.get(target.name)
    outside = 0

    def cast(parts):
        nonlocal outside
        data = parts[0]
        if limit is not None and may_exceed(data, limit):
            wide = data.float()
            count = int((wide.abs() > limit).sum())  # inf included; NaN compares false
            if count:
                outside += count
                data = wide.clamp(-limit, limit)
        return data  # by_rows casts it as it copies it into the output

    out = by_rows([tensor], target, cast)
    if outside:
        clamped[key] = outside
    return out


def cast_targets(ident: Identification, target: DType | None, vae_target: DType | None
                 ) -> tuple[Callable[[str], DType | None], str | None]:
    """Which dtype each key is cast to (None: kept as it is), and the note to show when the
    SDXL VAE keeps its precision: ``vae_target`` for the VAE where given, else ``target``,
    except that SDXL's VAE (base and refiner checkpoints) is kept, since it overflows in fp16.
    What prune and convert both follow."""
    vae_prefix = next((c.prefix for c in ident.components if c.name == "vae" and c.prefix),
                      None)
    # A VAE alone that fits SDXL's among others, with no metadata to say whose it is,
    # is kept as if it were SDXL's: casting the one that overflows is the worse mistake.
    fp16_unsafe_vae = ident.family in SDXL_VAE_FAMILIES or (
        ident.family is None and bool(set(ident.compatible_families) & set(SDXL_VAE_FAMILIES)))
    note = None
    if vae_target is None and fp16_unsafe_vae and target is not None and vae_prefix:
        note = ("the SDXL VAE keeps its precision (it overflows in fp16); --vae-dtype casts it"
                if ident.family else
                "the VAE keeps its precision: it fits SDXL's, which overflows in fp16, and "
                "nothing says whose it is; --vae-dtype casts it")

    def wanted(key: str) -> DType | None:
        in_vae = vae_prefix is not None and key.startswith(vae_prefix)
        if in_vae and vae_target:
            return vae_target
        return None if in_vae and fp16_unsafe_vae else target

    return wanted, note


def parse_dtype(name: str | None, option: str) -> DType | None:
    """The dtype a ``--dtype``-like option names (None: not given); a usage error if none."""
    if name is None:
        return None
    if name not in CLI_NAMES:
        raise UsageError(f"{option} must be one of {', '.join(CLI_NAMES)}, not {name!r}")
    return CLI_NAMES[name]


def prune(src: str, out: str, *, dtype: str | None = None, vae_dtype: str | None = None,
          ema: str = "drop", drop: list[str] | None = None,
          progress: Progress | None = None, hash_sources: bool = False,
          fsync: bool = True) -> PruneReport:
    if ema not in ("drop", "use", "keep"):
        raise UsageError(f"--ema must be drop, use or keep, not {ema!r}")
    target, vae_target = parse_dtype(dtype, "--dtype"), parse_dtype(vae_dtype, "--vae-dtype")
    with open_checkpoint(src) as checkpoint:
        ident = identify_checkpoint(checkpoint)
        report = PruneReport(ident.family)
        prefixes = {c.name: c.prefix for c in ident.components if c.prefix}
        drop = [component_name(d) for d in drop or ()]
        unknown = [d for d in drop if d not in prefixes]
        if unknown:
            raise UsageError(f"{src} has no {unknown[0]} component to drop; it has "
                             f"{', '.join(prefixes) or 'no prefixed components'}")
        if prefixes and set(drop) >= set(prefixes):
            raise UsageError(f"--drop {','.join(prefixes)} would leave none of {src}'s "
                             f"components; drop some of {', '.join(prefixes)}, not all")
        wanted_for, note = cast_targets(ident, target, vae_target)
        if note:
            report.notes.append(note)
        ema_for = _ema_sources(checkpoint) if ema == "use" else {}
        report.ema = "used" if ema_for else ema if any(
            k.startswith(EMA_PREFIX) for k in checkpoint) else "none"
        planned = []
        for key, tensor in checkpoint.items():
            group = _drop_group(key, ema, drop, prefixes)
            if group:
                report.dropped[group] = report.dropped.get(group, 0) + 1
                continue
            source = checkpoint[ema_for[key]] if key in ema_for else tensor
            wanted = wanted_for(key)
            castable = (wanted is not None and source.dtype.is_float and source.dtype.bits >= 8
                        and key not in MARKERS and source.dtype != wanted)
            if castable:
                produce = partial(clamped_cast, source, wanted, key, report.clamped)
                report.cast += 1
            elif source.is_contiguous:
                produce = partial(copy_range, source)
            else:
                produce = source.read
            planned.append(Planned(key, wanted if castable else source.dtype, source.shape,
                                   produce))
        report.kept = len(planned)
        if not planned:
            raise UsageError(f"nothing of {src} would be left (dropped "
                             f"{', '.join(report.dropped) or 'everything'}); "
                             "a file with no tensors is not written")
        metadata = {**inherited(checkpoint.metadata),
                    **provenance("prune", [src], source_hashes([src], hash_sources),
                                 dtype=dtype or "", vae_dtype=vae_dtype or "", ema=ema,
                                 drop=drop)}
        write_safetensors(out, planned, metadata, inputs=(src,), progress=progress,
                          fsync=fsync)
    return report


def _drop_group(key: str, ema: str, drop, prefixes: dict[str, str]) -> str | None:
    kind = extra_kind(key)
    if kind == "ema":
        return None if ema == "keep" else "ema weights"
    if kind in ("loss", "schedule"):
        return "training leftovers"
    for name in drop:
        if key.startswith(prefixes[name]):
            return f"component {name}"
    return None


def _ema_sources(checkpoint) -> dict[str, str]:
    """Diffusion-model key -> its EMA copy; refuses unless every weight has one of the same
    shape. LDM's EMA names the weights of its wrapped model without dots, after ``model.``:
    ``model.diffusion_model.input_blocks.0.0.weight`` has the copy
    ``model_ema.diffusion_modelinput_blocks00weight`` (as diffusers' single-file loader
    reads it with ``extract_ema``)."""
    weights = [k for k in checkpoint if k.startswith(_DIFFUSION_PREFIX)]
    pairs = {k: EMA_PREFIX + "".join(k.split(".")[1:]) for k in weights}
    found = {k: e for k, e in pairs.items()
             if e in checkpoint and checkpoint[e].shape == checkpoint[k].shape}
    if not weights or len(found) != len(weights):
        raise UsageError(f"--ema use needs an EMA copy of every diffusion model weight; "
                         f"{checkpoint.path} has {len(found)} of {len(weights)}")
    return found
