"""``sample``: a synthetic model with exactly the key names of a family and layout.

The keys and shapes come from the family declaration (``arch.families``), so a sample is
what the registry believes a real file looks like; the test suite checks those beliefs
against the diffusers/transformers classes and other tools' key tables, then builds its test
data with this. Values are seeded random numbers (deterministic per key, whatever the order
or the set of components), or holes in a sparse file (``sparse``: a full-size FLUX header
in milliseconds, for tests that read headers only).
"""

from __future__ import annotations

import zlib
from functools import partial

from ..arch.detect import INPUT_CHANNEL_VARIANTS
from ..arch.families import Family, family
from ..engine.writer import Planned, Progress, Zeros, write_safetensors
from ..errors import UsageError
from ..formats.dtypes import BY_NAME, CLI_NAMES, DType, torch_dtype

LAYOUTS = ("ldm", "kohya", "comfyui")
_INT_KEYS = ("position_ids",)
_NORM_WEIGHTS = ("norm.weight", "_norm.weight", "norm1.weight", "norm2.weight", "norm3.weight",
                 "ln_1.weight", "ln_2.weight", "ln_final.weight", ".scale")


def sample_table(fam: Family, *, layout: str = "ldm", tiny: bool = False,
                 components: list[str] | None = None, variant: str | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the sample ``sample`` writes."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    names = components or (list(fam.component_names) if layout != "comfyui" else
                           ["diffusion_model"])
    if layout == "kohya" and not all(fam.component(n).kohya_prefix for n in names
                                     if n in fam.component_names):
        raise UsageError(f"ckptkit knows the kohya layout of sdxl only, not of {fam.id}")
    unknown = [n for n in names if n not in fam.component_names]
    if unknown:
        raise UsageError(f"{fam.id} has no component {unknown[0]!r}; it has "
                         f"{', '.join(fam.component_names)}")
    if layout == "comfyui" and len(names) != 1:
        raise UsageError("a comfyui-layout sample holds one component: name it with "
                         "--components")
    table: dict[str, tuple[int, ...]] = {}
    for name in names:
        table.update(fam.component(name).keys(tiny=tiny, layout=layout))
    if variant:
        _apply_variant(table, fam, variant)
    return table


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
           fmt: str = "safetensors", variant: str | None = None, seed: int = 0,
           progress: Progress | None = None) -> dict[str, int]:
    """Writes the sample; returns its tensor and parameter counts."""
    try:
        fam = family(family_id)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    if dtype not in CLI_NAMES:
        raise UsageError(f"--dtype must be one of {', '.join(CLI_NAMES)}, not {dtype!r}")
    table = sample_table(fam, layout=layout, tiny=tiny, components=components, variant=variant)
    floats = CLI_NAMES[dtype]
    metadata = modelspec(fam, variant, tiny)
    if fmt == "ckpt":
        if sparse:
            raise UsageError("--sparse makes a safetensors file with holes; not a .ckpt")
        _write_ckpt(out, table, floats, seed, metadata)
    elif fmt == "safetensors":
        planned = []
        for key, shape in table.items():
            dt = _dtype_of(key, floats)
            if sparse:
                produce = partial(Zeros, dt.nbytes(_numel(shape)))
            else:
                produce = partial(_values, key, shape, dt, seed)
            planned.append(Planned(key, dt, shape, produce))
        write_safetensors(out, planned, metadata, progress=progress)
    else:
        raise UsageError(f"--format must be safetensors or ckpt, not {fmt!r}")
    return {"tensors": len(table), "parameters": sum(_numel(s) for s in table.values())}


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
