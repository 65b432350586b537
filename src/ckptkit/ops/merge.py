"""``merge``: models combined key by key on the streaming engine, checked before anything is
read, with the recipe in the output's metadata.

Every input is identified first: models of different families, or keys whose shapes differ,
are refused before a tensor is read (an SDXL + SD 1.5 merge stops in milliseconds instead of
allocating hundreds of GB). Integer and marker tensors (CLIP ``position_ids``, ``v_pred``)
are copied from the first model, never interpolated; an inpainting (9-channel) or pix2pix
(8-channel) input convolution merges the channels the models share and takes the extra ones
from the model that has them, as AUTOMATIC1111 does. Each output tensor reads the same key
of every input, computes in fp32 and is cast to the output dtype.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .. import __version__
from ..arch.detect import INPUT_CHANNEL_VARIANTS, MARKERS, Identification
from ..engine.moves import copy_range
from ..engine.writer import Planned, Progress, write_safetensors
from ..errors import UsageError
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import CLI_NAMES, DType, torch_dtype
from .inspect import identify_checkpoint
from .merge_methods import METHODS, Method
from .provenance import provenance

RECIPE_KEY = "ckptkit.merge_recipe"
_LINEAGE_KEYS = (RECIPE_KEY, "sd_merge_recipe", "sd_merge_models", "mecha_recipe")
MISSING = ("take-a", "skip", "error")
SLICE_ELEMENTS = 1 << 22  # fp32 working set per slice of an element-wise merge: 16 MiB


@dataclass
class MergeReport:
    family: str | None
    merged: int = 0
    copied: int = 0
    skipped: int = 0
    ignored: int = 0  # keys only the other models have
    notes: list[str] = field(default_factory=list)


def _params(method: Method, given: dict[str, float | None]) -> dict[str, float]:
    unknown = [k for k, v in given.items() if v is not None and k not in method.defaults]
    if unknown:
        raise UsageError(f"{method.name} takes no --{unknown[0]} (it takes "
                         f"{', '.join('--' + p for p in method.defaults) or 'no parameters'})")
    return {k: (given.get(k) if given.get(k) is not None else v)
            for k, v in method.defaults.items()}


def _identify_all(paths: list[str], checkpoints: list[Checkpoint]) -> Identification:
    """Identifies every input, refuses any that is not a model of the first one's family;
    returns the first one's identification."""
    idents = [identify_checkpoint(ck) for ck in checkpoints]
    for path, ident in zip(paths, idents, strict=True):
        if ident.kind in ("lora", "unknown"):
            raise UsageError(f"{path} is a {ident.kind}, not a model to merge")
    first = idents[0]
    for path, ident in zip(paths[1:], idents[1:], strict=True):
        if (ident.family, ident.kind) != (first.family, first.kind):
            raise UsageError(f"cannot merge {os.path.basename(paths[0])} ({first.family} "
                             f"{first.kind}) with {os.path.basename(path)} ({ident.family} "
                             f"{ident.kind}): different models")
    return first


def _compute(method: Method, params: dict[str, float], key: str, sources: list[LazyTensor],
             out_dtype: DType, compute: str):
    import torch

    wide = getattr(torch, compute)
    kwargs = dict(params)
    if method.elementwise and len({s.shape for s in sources}) == 1 and sources[0].shape:
        return _in_slices(method, kwargs, sources, wide, torch_dtype(out_dtype))
    tensors = [s.read().to(wide) for s in sources]
    if "seed" in kwargs:
        kwargs["seed"] = int(kwargs["seed"])
        kwargs["key_seed"] = zlib.crc32(key.encode())
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:  # an input convolution with extra channels (inpaint, pix2pix)
        shared = min(t.shape[1] for t in tensors)
        widest = max(tensors, key=lambda t: t.shape[1]).clone()
        widest[:, :shared] = method.func([t[:, :shared] for t in tensors], **kwargs)
        result = widest
    else:
        result = method.func(tensors, **kwargs)
    return result.to(torch_dtype(out_dtype))


def _in_slices(method: Method, kwargs, sources: list[LazyTensor], wide, out_dtype):
    """Element-wise methods on big tensors: computed a slice of rows at a time, so that
    memory holds the inputs as stored plus one slice in fp32, not every input in fp32."""
    import torch

    stored = [s.read() for s in sources]
    out = torch.empty(stored[0].shape, dtype=out_dtype)
    rows = max(1, SLICE_ELEMENTS // max(1, stored[0][0].numel()))
    for start in range(0, stored[0].shape[0], rows):
        part = [t[start:start + rows].to(wide) for t in stored]
        out[start:start + rows] = method.func(part, **kwargs).to(out_dtype)
    return out


def _is_data(tensor: LazyTensor, key: str) -> bool:
    """Whether a key holds weights to interpolate (not integers, markers or empty)."""
    return (tensor.dtype.is_float and tensor.dtype.bits >= 8 and key not in MARKERS
            and tensor.numel > 0)


def merge(method_name: str, paths: list[str], out: str, *, params: dict[str, float | None],
          dtype: str | None = None, compute_dtype: str = "float32",
          components: list[str] | None = None, missing: str = "take-a",
          progress: Progress | None = None) -> MergeReport:
    method = METHODS.get(method_name)
    if method is None:
        raise UsageError(f"unknown merge method {method_name!r}; known: {', '.join(METHODS)}")
    if not method.arity_ok(len(paths)):
        raise UsageError(f"{method.name} takes {method.inputs.replace('+', ' or more')} models, "
                         f"not {len(paths)}")
    if missing not in MISSING:
        raise UsageError(f"--missing must be one of {', '.join(MISSING)}")
    if dtype is not None and dtype not in CLI_NAMES:
        raise UsageError(f"--dtype must be one of {', '.join(CLI_NAMES)}")
    values = _params(method, params)
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p)) for p in paths]
        first = _identify_all(paths, checkpoints)
        report = MergeReport(first.family)
        selected = _component_prefixes(first, components)
        planned = _plan(method, values, paths, checkpoints, dtype, compute_dtype, selected,
                        missing, report)
        metadata = {**checkpoints[0].metadata, **_recipe(method, values, paths, checkpoints,
                                                        dtype, components)}
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress)
    return report


def _component_prefixes(ident: Identification, components: list[str] | None
                        ) -> tuple[str, ...] | None:
    if not components:
        return None
    prefixes = {c.name: c.prefix for c in ident.components}
    unknown = [c for c in components if c not in prefixes]
    if unknown:
        raise UsageError(f"the models have no {unknown[0]} component; they have "
                         f"{', '.join(prefixes)}")
    return tuple(prefixes[c] for c in components)


def _plan(method: Method, values, paths, checkpoints, dtype, compute, selected, missing,
          report: MergeReport) -> list[Planned]:
    first, others = checkpoints[0], checkpoints[1:]
    planned = []
    for key, tensor in first.items():
        out_dtype = CLI_NAMES[dtype] if dtype and _is_data(tensor, key) else tensor.dtype
        in_scope = selected is None or key.startswith(selected)
        absent = [p for p, ck in zip(paths[1:], others, strict=True) if key not in ck]
        if absent and in_scope and _is_data(tensor, key):
            if missing == "error":
                raise UsageError(f"{absent[0]} has no {key} (use --missing take-a or skip)")
            if missing == "skip":
                report.skipped += 1
                continue
        if not in_scope or absent or not _is_data(tensor, key):
            report.copied += 1
            produce = (partial(copy_range, tensor) if tensor.is_contiguous
                       and out_dtype == tensor.dtype else partial(_cast, tensor, out_dtype))
            planned.append(Planned(key, out_dtype, tensor.shape, produce))
            continue
        sources = [tensor, *(ck[key] for ck in others)]
        shape = _merged_shape(key, sources, paths)
        planned.append(Planned(key, out_dtype, shape,
                               partial(_compute, method, values, key, sources, out_dtype,
                                       compute)))
        report.merged += 1
    report.ignored = len({k for ck in others for k in ck} - set(first))
    return planned


def _merged_shape(key: str, sources: list[LazyTensor], paths: list[str]) -> tuple[int, ...]:
    shapes = [s.shape for s in sources]
    if len(set(shapes)) == 1:
        return shapes[0]
    channel_variant = key.endswith(tuple(INPUT_CHANNEL_VARIANTS)) and all(
        len(s) == len(shapes[0]) and s[0] == shapes[0][0] and s[2:] == shapes[0][2:]
        for s in shapes)
    if channel_variant:
        return max(shapes, key=lambda s: s[1])
    odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
    raise UsageError(f"{key} is {list(shapes[0])} in {os.path.basename(paths[0])} but "
                     f"{list(shapes[odd])} in {os.path.basename(paths[odd])}: these models "
                     "cannot be merged")


def _cast(tensor: LazyTensor, dtype: DType):
    return tensor.read().to(torch_dtype(dtype))


def _recipe(method: Method, values, paths, checkpoints, dtype, components) -> dict[str, str]:
    recipe: dict[str, Any] = {"method": method.name, "params": values,
                              "inputs": [os.path.basename(p) for p in paths],
                              "dtype": dtype, "components": components,
                              "ckptkit": __version__}
    lineage = {}
    for path, ck in zip(paths, checkpoints, strict=True):
        found = {k: ck.metadata[k] for k in _LINEAGE_KEYS if k in ck.metadata}
        if found:
            lineage[os.path.basename(path)] = found
    meta = provenance("merge", paths)
    meta[RECIPE_KEY] = json.dumps(recipe)
    if lineage:
        meta["ckptkit.merge_lineage"] = json.dumps(lineage)
    return meta
