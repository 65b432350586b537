"""``sample``: a synthetic model with exactly the key names of a family and layout.

The keys and shapes come from the family declaration (``arch.families``), so a sample is
what the registry believes a real file looks like; the test suite checks those beliefs
against the diffusers/transformers classes and other tools' key tables, then builds its test
data with this. Values are seeded random numbers (deterministic per key, whatever the order
or the set of components), or holes in a sparse file (``sparse``: a full-size FLUX header
in milliseconds, for tests that read headers only).

Layouts that rename more than prefixes (diffusers; kohya's SD 1.x, which uses diffusers names)
are made by converting the ``ldm`` sample: its values go through the layout moves, so both
samples of one seed hold the same numbers. A diffusers sample of several components is a
pipeline folder (``model_index.json``, a subfolder with ``config.json`` and weights per
component, ``scheduler/``), written in a hidden folder beside the target and renamed into
place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..arch import diffusers_layout
from ..arch.detect import INPUT_CHANNEL_VARIANTS
from ..arch.families import DIFFUSION_MODEL, Family, component_name, family
from ..arch.keys import KeyTable
from ..arch.layouts import Move, to_canonical
from ..engine.atomic import TEMPORARY_SUFFIX, remove_stale_temporaries, temporary_prefix
from ..engine.moves import plan_moves
from ..engine.writer import Planned, Progress, Zeros, write_safetensors
from ..errors import OutputError, UsageError
from ..formats.dtypes import BY_NAME, CLI_NAMES, DType, torch_dtype
from ..formats.sniff import EXTENSIONS, SAFETENSORS, TORCH_ZIP

LAYOUTS = ("ldm", "kohya", "comfyui", "diffusers")
_INT_KEYS = ("position_ids",)
# The diffusers release whose classes the configs were checked against: a folder's
# model_index.json says which diffusers wrote it, and diffusers reads that (an inpainting
# folder without it cannot be loaded).
_DIFFUSERS_VERSION = "0.42.1"
_NORM_WEIGHTS = ("norm.weight", "_norm.weight", "norm1.weight", "norm2.weight", "norm3.weight",
                 "ln_1.weight", "ln_2.weight", "ln_final.weight", ".scale")


def sample_table(fam: Family, *, layout: str = "ldm", tiny: bool = False,
                 components: list[str] | None = None, variant: str | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the sample ``sample`` writes."""
    names = _names(fam, layout, components)
    if _renames(fam, layout):
        return {k: v for part in _conversions(fam, layout, tiny, names, variant)
                for k, v in part.table.items()}
    table: dict[str, tuple[int, ...]] = {}
    for name in names:
        table.update(fam.component(name).keys(tiny=tiny, layout=layout))
    if variant:
        _apply_variant(table, fam, variant)
    return table


def _names(fam: Family, layout: str, components: list[str] | None) -> list[str]:
    """The components a sample holds, checked against the family and the layout."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    names = [component_name(n) for n in components] if components else (
        list(fam.component_names) if layout != "comfyui" else [DIFFUSION_MODEL])
    unknown = [n for n in names if n not in fam.component_names]
    if unknown:
        raise UsageError(f"{fam.id} has no component {unknown[0]!r}; it has "
                         f"{', '.join(fam.component_names)}")
    if layout == "kohya" and not (diffusers_layout.kohya_renames(fam) or all(
            fam.component(n).kohya_prefix for n in names)):
        raise UsageError(f"ckptkit knows the kohya layout of sd1 and sdxl only, not of {fam.id}")
    if layout == "comfyui" and len(names) != 1:
        raise UsageError("a comfyui-layout sample holds one component: name it with "
                         "--components")
    return names


def _renames(fam: Family, layout: str) -> bool:
    """Whether ``layout`` renames ``fam``'s keys beyond prefixes (made from the ldm sample)."""
    return layout == "diffusers" or (layout == "kohya" and diffusers_layout.kohya_renames(fam))


@dataclass(frozen=True)
class _Conversion:
    """One component of a renamed-layout sample: its ldm keys, the moves to the canonical
    names and from those to the layout's, and the keys and shapes that result."""

    name: str
    ldm: KeyTable
    to_canonical: list[Move]
    to_layout: list[Move]
    table: KeyTable


def _conversions(fam: Family, layout: str, tiny: bool, names: list[str],
                 variant: str | None) -> list[_Conversion]:
    ldm = {n: fam.component(n).keys(tiny=tiny, layout="ldm") for n in names}
    if variant:
        _apply_variant(ldm.get(DIFFUSION_MODEL, {}), fam, variant)
    parts = []
    for name in names:
        canonical_moves, _ = to_canonical(fam.component(name), set(ldm[name]))
        canonical = diffusers_layout.moved_table(canonical_moves, ldm[name])
        with _unwritable(fam, name, layout):
            if layout == "diffusers":
                moves = diffusers_layout.to_diffusers(fam, name, tiny, set(canonical))
            else:
                moves = diffusers_layout.kohya_moves(fam, name, tiny, set(canonical)) or []
        parts.append(_Conversion(name, ldm[name], canonical_moves, moves,
                                 diffusers_layout.moved_table(moves, canonical)))
    return parts


@contextmanager
def _unwritable(fam: Family, name: str, layout: str):
    """A component the layout's model class cannot hold (a config diffusers cannot build)
    is a usage error, not a crash."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(f"{fam.id}'s {name} cannot be written in the {layout} layout: "
                         f"{exc}") from None


def _apply_variant(table: dict[str, tuple[int, ...]], fam: Family, variant: str) -> None:
    for key, variants in INPUT_CHANNEL_VARIANTS.items():
        channels = {name: count for count, name in variants.items() if name}
        if variant in channels:
            name = next((k for k in table if k == key or k.endswith("." + key)), None)
            if name is None:
                raise UsageError(f"the {variant} variant changes the diffusion model's input; "
                                 "include the diffusion_model component")
            shape = table[name]
            table[name] = (shape[0], channels[variant], *shape[2:])
            return
    raise UsageError(f"{fam.id} has no {variant!r} variant that changes its weights "
                     "(v-prediction and turbo models differ only in metadata)")


def _dtype_of(key: str, floats: DType) -> DType:
    return BY_NAME["I64"] if key.endswith(_INT_KEYS) else floats


def _values(key: str, shape: tuple[int, ...], dtype: DType, seed: int):
    import torch

    if dtype.kind != "float":
        return torch.arange(shape[-1]).expand(shape).clone() if shape else torch.tensor(0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=gen) * 0.02
    if key.endswith(_NORM_WEIGHTS):  # norms start near 1, as trained ones are
        values += 1.0
    return values.to(torch_dtype(dtype))


def modelspec(fam: Family, variant: str | None, tiny: bool) -> dict[str, str]:
    """ModelSpec metadata saying what the sample is (as a real release's would)."""
    arch = fam.architectures[0] if fam.architectures else fam.id
    return {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
            "modelspec.implementation": "ckptkit sample",
            "modelspec.title": f"ckptkit {'tiny ' if tiny else ''}sample of {fam.name}"
                               + (f" ({variant})" if variant else ""),
            "modelspec.resolution": "{}x{}".format(*fam.sampling.resolution)}


def sample(family_id: str, out: str, *, layout: str = "ldm", dtype: str = "fp16",
           tiny: bool = False, sparse: bool = False, components: list[str] | None = None,
           fmt: str | None = None, variant: str | None = None, seed: int = 0,
           progress: Progress | None = None) -> dict[str, Any]:
    """Writes the sample; returns its family id, tensor and parameter counts. ``fmt``:
    "safetensors" or "ckpt"; by default the one ``out``'s extension names."""
    try:
        fam = family(family_id)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    if dtype not in CLI_NAMES:
        raise UsageError(f"--dtype must be one of {', '.join(CLI_NAMES)}, not {dtype!r}")
    fmt = _format(out, fmt)
    floats = CLI_NAMES[dtype]
    metadata = modelspec(fam, variant, tiny)
    if _renames(fam, layout):
        if fmt != "safetensors":
            raise UsageError(f"the {layout} layout is written as safetensors, not as a .ckpt")
        table = _write_renamed(out, fam, layout, tiny, components, variant, floats, seed,
                               sparse, metadata, progress)
    else:
        table = sample_table(fam, layout=layout, tiny=tiny, components=components,
                             variant=variant)
        if fmt == "ckpt":
            if sparse:
                raise UsageError("--sparse makes a safetensors file with holes; not a .ckpt")
            _write_ckpt(out, table, floats, seed, metadata)
        else:
            write_safetensors(out, [_planned(k, s, _dtype_of(k, floats), seed, sparse)
                                    for k, s in table.items()], metadata, progress=progress)
    return {"family": fam.id, "tensors": len(table),
            "parameters": sum(_numel(s) for s in table.values())}


def _format(out: str, fmt: str | None) -> str:
    """The format to write: ``fmt``, unless the name says the other one (loaders choose
    their reader by the extension: a pickle named .safetensors fails to load, and a .ckpt
    that is not one too), else the extension's, else safetensors."""
    if fmt not in (None, "safetensors", "ckpt"):
        raise UsageError(f"--format must be safetensors or ckpt, not {fmt!r}")
    ext = os.path.splitext(out)[1].lower()
    named = ("safetensors" if ext in EXTENSIONS[SAFETENSORS] else
             "ckpt" if ext in EXTENSIONS[TORCH_ZIP] else None)
    if fmt and named and fmt != named:
        raise UsageError(f"--format {fmt} writes a {_FORMAT_NAMES[fmt]}, but {out} is named "
                         f"{ext}, which loaders read as a {_FORMAT_NAMES[named]}; name it "
                         f"{'.safetensors' if fmt == 'safetensors' else '.ckpt'}")
    return fmt or named or "safetensors"


_FORMAT_NAMES = {"safetensors": "safetensors file", "ckpt": "PyTorch pickle"}


def _write_renamed(out: str, fam: Family, layout: str, tiny: bool,
                   components: list[str] | None, variant: str | None, floats: DType, seed: int,
                   sparse: bool, metadata: dict[str, str], progress: Progress | None
                   ) -> KeyTable:
    """A sample in a layout made from the ldm one: one file, or a diffusers folder when it
    holds several components. Returns its keys and shapes."""
    parts = _conversions(fam, layout, tiny, _names(fam, layout, components), variant)
    planned = {p.name: _plan_converted(p, floats, seed, sparse) for p in parts}
    if layout == "diffusers":
        metadata = {**metadata, "format": "pt"}  # what diffusers and transformers write
    if layout == "diffusers" and len(parts) > 1:
        _write_folder(out, fam, tiny, parts, planned, metadata, progress, variant)
    else:
        write_safetensors(out, [x for p in parts for x in planned[p.name]], metadata,
                          progress=progress)
    return {k: v for part in parts for k, v in part.table.items()}


def _planned(key: str, shape: tuple[int, ...], dt: DType, seed: int, sparse: bool) -> Planned:
    if sparse:
        return Planned(key, dt, shape, partial(Zeros, dt.nbytes(_numel(shape))))
    return Planned(key, dt, shape, partial(_values, key, shape, dt, seed))


@dataclass(frozen=True)
class _Generated:
    """A tensor made when read, which ``plan_moves`` takes as it takes one of a file."""

    shape: tuple[int, ...]
    dtype: DType
    read: Callable[[], Any]
    is_contiguous: bool = False  # so that every move reads it (there are no file bytes)
    byte_rows: bool = False


def _plan_converted(part: _Conversion, floats: DType, seed: int, sparse: bool
                    ) -> list[Planned]:
    """The component's tensors in the layout's names: the ldm sample's values, moved."""
    if sparse:
        return [_planned(k, s, _dtype_of(k, floats), seed, True) for k, s in part.table.items()]
    ldm = {}
    for key, shape in part.ldm.items():
        dt = _dtype_of(key, floats)
        ldm[key] = _Generated(shape, dt, partial(_values, key, shape, dt, seed))
    canonical = {p.key: _Generated(p.shape, p.dtype, p.produce)
                 for p in plan_moves(part.to_canonical, ldm)}
    return plan_moves(part.to_layout, canonical)


class _Job:
    """Several files' writes reported to one progress as one job."""

    def __init__(self, progress: Progress, planned: list[Planned]):
        self.progress = progress
        progress.start(sum(p.nbytes for p in planned), len(planned))

    def start(self, total_bytes: int, total_items: int) -> None:
        """A file's own totals are already counted in the job's."""

    def update(self, nbytes: int, items: int = 0) -> None:
        self.progress.update(nbytes, items)


def _write_folder(out: str, fam: Family, tiny: bool, parts: list[_Conversion],
                  planned: dict[str, list[Planned]], metadata: dict[str, str],
                  progress: Progress | None, variant: str | None) -> None:
    """The diffusers pipeline folder (its index naming the ``variant``'s pipeline), made in
    a hidden folder beside ``out`` and renamed to it when complete: a failure leaves no
    folder under ``out``'s name."""
    index, subfolders = diffusers_layout.folder(fam, variant)
    configs = {}
    for part in parts:
        with _unwritable(fam, part.name, "diffusers"):
            configs[part.name] = diffusers_layout.component_config(fam, part.name, tiny)
        _fit_input_channels(configs[part.name], part)
    target = os.path.abspath(out)
    parent = os.path.dirname(target)
    if os.path.lexists(target):
        raise OutputError("already exists; a diffusers sample is a new folder: remove it or "
                          "choose another name", out)
    if not os.path.isdir(parent):
        raise OutputError(f"the output folder {parent} does not exist", out)
    remove_stale_temporaries(target)
    tmp = tempfile.mkdtemp(prefix=temporary_prefix(target)[1], suffix=TEMPORARY_SUFFIX,
                           dir=parent)
    try:
        job = _Job(progress, [x for p in planned.values() for x in p]) if progress else None
        for sub, (comp, weights) in subfolders.items():
            if comp not in configs:
                index[sub] = [None, None]
                continue
            os.mkdir(os.path.join(tmp, sub))
            _write_json(os.path.join(tmp, sub, "config.json"), configs[comp])
            write_safetensors(os.path.join(tmp, sub, weights), planned[comp], metadata,
                              progress=job)
        os.mkdir(os.path.join(tmp, "scheduler"))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                    diffusers_layout.scheduler_config(fam))
        _write_json(os.path.join(tmp, "model_index.json"),
                    {"_diffusers_version": _DIFFUSERS_VERSION, **index})
        try:
            os.rename(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot create the folder ({exc.strerror})", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fit_input_channels(config: dict, part: _Conversion) -> None:
    """An input-channel variant (inpainting, FLUX Fill...) widens the model's input only."""
    for move in part.to_layout:
        if move.sources and move.sources[0] in INPUT_CHANNEL_VARIANTS:
            channels = part.table[move.target][1]
            if channels != config.get("in_channels"):
                config["out_channels"] = config.get("out_channels") or config["in_channels"]
                config["in_channels"] = channels


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_ckpt(out: str, table, floats: DType, seed: int, metadata: dict[str, str]) -> None:
    """A real ``torch.save`` file, as training code leaves them (weights under state_dict)."""
    import torch

    from ..engine.atomic import AtomicOutput

    state = {k: _values(k, s, _dtype_of(k, floats), seed) for k, s in table.items()}
    with AtomicOutput(out) as target:
        with open(target.fd, "wb", closefd=False) as f:
            torch.save({"state_dict": state, "ckptkit_sample": metadata}, f)
        target.commit()


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total
