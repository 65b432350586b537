"""``convert``: any checkpoint to safetensors, streamed, bit-exact or exactly cast.

Each output tensor is planned from the input's header: a contiguous tensor kept in its dtype
is a ``CopyRange`` (copied file to file by the kernel, bit-identical by construction); a
view into a shared storage is read and written as its own contiguous data; a cast reads one
tensor, casts it with torch and writes it (to fp8, values beyond its range are clamped and
counted, as ``prune`` does; to 16 or 32 bits exactly as torch casts, overflows counted).
Casting follows ``prune.cast_targets``: SDXL's VAE keeps its precision unless ``vae_dtype``
says otherwise. The source's metadata (a LoRA's training tags, a model's ModelSpec; a
pickle's scalar entries such as ``global_step``) is carried over unless asked not to: a
converted file says what its source said, less the hashes of the source's bytes
(``provenance.FILE_HASH_KEYS``). Entries of pickles that are not weights (see
``formats.torch_pickle.locate_weights``) are dropped and listed, with the tensors they hold
counted. A file with no tensors is refused rather than written empty, and so is an output
name that says pickle or GGUF: loaders pick their reader by extension.

A dequantized file is the exception to carrying the source's ``ckptkit.*`` keys over: a
``quantize`` output's keys say it was quantized (``ckptkit.type: Q8_0``), which its
dequantized values no longer are, so they are replaced by convert's own provenance (the
quantized file as the source, its SHA-256 when known): lineage then goes from the
dequantized file to the quantized one, and from there to the original.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

from ..engine.atomic import check_output_path
from ..engine.moves import copy_range
from ..engine.slices import by_rows, heap_for_temporaries, may_exceed
from ..engine.writer import Planned, Progress, check_safetensors_name, write_safetensors
from ..errors import FormatError, counted
from ..formats import LazyTensor, open_checkpoint
from ..formats.dtypes import CLI_NAMES, DType, torch_dtype
from ..formats.gguf import ORIG_SHAPE, STRUCTURAL_KEYS
from ..formats.quantized import QuantizedTensor
from ..formats.torch_pickle import Summary
from .inspect import identify_checkpoint
from .provenance import inherited, provenance
from .prune import cast_targets, clamped_cast, parse_dtype

CONVERT_DTYPES = tuple(CLI_NAMES)
@dataclass
class ConvertReport:
    source_format: str
    tensors: int = 0
    bytes: int = 0
    cast: int = 0
    overflowed: dict[str, int] = field(default_factory=dict)  # key -> values that became inf
    clamped: dict[str, int] = field(default_factory=dict)  # key -> values clamped (fp8)
    dropped: list[str] = field(default_factory=list)  # entries not written (nor kept as metadata)
    dropped_tensors: dict[str, int] = field(default_factory=dict)  # dropped entry -> its tensors
    notes: list[str] = field(default_factory=list)


def _casting(key: str, tensor: LazyTensor, target: DType, report: ConvertReport):
    def cast(parts):
        import torch

        data = parts[0]
        if not may_exceed(data, torch.finfo(torch_dtype(target)).max):
            return data  # by_rows casts it as it copies it into the output: one pass
        # Values near or beyond the target's range (or inf, NaN): count those the cast
        # makes infinite. isinf is not implemented for the fp8 types: count on fp32 there.
        out = data.to(torch_dtype(target))
        wide = data if data.element_size() > 1 else data.float()
        overflow = int(torch.isinf(out.float() if out.element_size() == 1 else out).sum()) \
            - int(torch.isinf(wide).sum())
        if overflow > 0:
            report.overflowed[key] = report.overflowed.get(key, 0) + overflow
        return out

    return partial(by_rows, [tensor], target, cast)


def _dequantized(key: str, tensor: QuantizedTensor, target: DType, report: ConvertReport):
    """A quantized tensor's values in ``target``, rounded once from what its format stores;
    values beyond the target's range (an fp8 weight whose scale is too big for fp16) become
    infinite, as a cast makes them, and are counted."""
    import torch

    out = tensor.dequantize(target)
    if not may_exceed(out, torch.finfo(out.dtype).max):  # one aminmax pass; isinf is 30x slower
        return out
    overflow = int(torch.isinf(out).sum())
    if overflow:
        report.overflowed[key] = report.overflowed.get(key, 0) + overflow
    return out


def _source_metadata(checkpoint) -> dict[str, str]:
    if checkpoint.format == "safetensors":
        return dict(checkpoint.metadata)
    if checkpoint.format == "gguf":  # less what describes the GGUF encoding itself
        return {k: v for k, v in checkpoint.metadata.items()
                if k not in STRUCTURAL_KEYS and not k.startswith(ORIG_SHAPE)}
    # Pickles carry no string metadata; their scalar entries (global_step, epoch) are kept,
    # since loaders use some of them (diffusers guesses SD2 v-prediction from global_step).
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in checkpoint.extras.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, Summary)}


def convert(src: str, dst: str, *, dtype: str | None = None, vae_dtype: str | None = None,
            keep_metadata: bool = True, progress: Progress | None = None,
            fsync: bool = True) -> ConvertReport:
    """Writes ``src`` as safetensors to ``dst``; ``dtype`` casts floating tensors (and
    ``vae_dtype`` the VAE's); ``keep_metadata=False`` writes none of the source's metadata."""
    target, vae_target = parse_dtype(dtype, "--dtype"), parse_dtype(vae_dtype, "--vae-dtype")
    check_output_path(dst, (src,))  # an output over the input is that error first
    check_safetensors_name(dst)
    with open_checkpoint(src) as checkpoint:
        if not checkpoint.tensors:
            raise FormatError(f"no tensors to convert: {_contents(checkpoint)}", src)
        report = ConvertReport(checkpoint.format, notes=list(checkpoint.notes))
        # "format" is safetensors' own key, saying whose tensors these are: this writer's
        kept = inherited(_source_metadata(checkpoint), ("format",)) if keep_metadata else {}
        metadata = {"format": "pt", **kept}
        report.dropped = [k for k in checkpoint.extras if k not in kept]
        report.dropped_tensors = {k: v.tensors for k, v in checkpoint.extras.items()
                                  if isinstance(v, Summary) and v.tensors}
        wanted_for = _cast_targets(checkpoint, target, vae_target, report)
        planned = []
        for key, tensor in checkpoint.items():
            castable = tensor.dtype.is_float and tensor.dtype.bits >= 8
            out_dtype = (wanted_for(key) if castable else None) or tensor.dtype
            if isinstance(tensor, QuantizedTensor) and out_dtype.bits > 8:
                produce = partial(_dequantized, key, tensor, out_dtype, report)
                report.cast += out_dtype != tensor.dtype
            elif out_dtype != tensor.dtype and out_dtype.bits == 8:
                produce = partial(clamped_cast, tensor, out_dtype, key, report.clamped)
                report.cast += 1
            elif out_dtype != tensor.dtype:
                produce = _casting(key, tensor, out_dtype, report)
                report.cast += 1
            elif tensor.is_contiguous:
                produce = partial(copy_range, tensor)
            else:
                produce = tensor.read
            planned.append(Planned(key, out_dtype, tensor.shape, produce))
        quantized = [p for p in planned if isinstance(checkpoint.tensors[p.key], QuantizedTensor)]
        if quantized:
            kinds = sorted({checkpoint.tensors[p.key].qtype for p in quantized})
            made = sorted({p.dtype.name for p in quantized})
            report.notes.append(f"{counted(len(quantized), 'quantized tensor')} "
                                f"({', '.join(kinds)}) written as their values in "
                                f"{', '.join(made)}")
            metadata = {k: v for k, v in metadata.items() if not k.startswith("ckptkit.")}
            metadata.update(provenance("convert", [src], dtype=dtype or "",
                                       dequantized=kinds))
        # dequantizing works a few MB at a time: those temporaries from the heap, not fresh
        # mappings (a Q8_0 tensor's dequantization took 4.7x less CPU, 10x fewer page faults)
        with heap_for_temporaries() if quantized else nullcontext():
            write_safetensors(dst, planned, metadata, inputs=(src,), progress=progress,
                              fsync=fsync)
        report.tensors = len(planned)
        report.bytes = sum(p.nbytes for p in planned)
    return report


def _cast_targets(checkpoint, target: DType | None, vae_target: DType | None,
                  report: ConvertReport):
    """The dtype for each key, as prune chooses it (the SDXL VAE kept, and said so); the file
    is identified only when something is to be cast."""
    if target is None and vae_target is None:
        return lambda key: None
    wanted_for, note = cast_targets(identify_checkpoint(checkpoint), target, vae_target)
    if note:
        report.notes.append(note)
    return wanted_for


def _contents(checkpoint) -> str:
    """What a checkpoint without tensors holds instead, in a few words."""
    if not checkpoint.extras:
        if checkpoint.format == "safetensors":
            return "the file holds no entries"
        where = f" at {checkpoint.weights_at}" if checkpoint.weights_at else ""
        return f"the pickle holds an empty dict{where}"
    names = [f"{k} ({v})" if isinstance(v, Summary) else k
             for k, v in list(checkpoint.extras.items())[:6]]
    more = len(checkpoint.extras) - len(names)
    listed = ", ".join(names) + (f", and {more} more" if more else "")
    return f"the pickle holds only entries that are not weights: {listed}"
