"""``quantize``: a diffusion model to GGUF (as ComfyUI-GGUF loads it), to ComfyUI's
per-layer fp8 ("fp8 scaled") safetensors, or to bitsandbytes' NF4/FP4 safetensors (as Forge
loads them), each tensor checked by dequantizing what was written.

The diffusion model is taken from the checkpoint (a full checkpoint's text encoders and VAE
are left out, as ComfyUI-GGUF and ComfyUI's diffusion-model loaders hold the denoiser alone)
and written under its names without the checkpoint prefix. GGUF types follow
``gguf_rules``; fp8 stores each 2-D weight (a Linear layer's) as fp8 with one float32 scale,
``weight = stored x weight_scale``, marked by ``<layer>.comfy_quant`` (the uint8 bytes of
``{"format": "float8_e4m3fn"}``), as ComfyUI's ``MixedPrecisionOps`` reads it; other tensors
keep their dtype. NF4/FP4 store the same weights in bitsandbytes' 4-bit layout (``quant.bnb4``)
under Forge's names: ``W`` (packed codes), ``W.absmax``, ``W.quant_map``,
``W.nested_absmax``, ``W.nested_quant_map`` and ``W.quant_state.bitsandbytes__nf4``.

No silent white images: every tensor is quantized a slice at a time into the bytes the writer
writes (the output file's pages, or for GGUF its write buffer), and each slice is dequantized
back from those bytes (``quant.dequant``, or for NF4 the reader's ``quant.bnb4.decode``
with the stored double-quantised absmax; not the quantizer's own numbers) and compared with
the source. A tensor whose source or result holds NaN or infinity, or whose relative RMS error
(sqrt(sum (q - x)^2 / sum x^2)) exceeds its type's bound (``ERROR_BOUNDS``), stops the run:
the temporary file is removed and nothing is left under the output's name. The errors are
summarised per type in the report.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

from ..engine.atomic import check_output_path
from ..engine.gguf_writer import GGUFTensor, write_gguf
from ..engine.slices import heap_for_temporaries
from ..engine.writer import Deferred, Planned, Progress, write_safetensors
from ..errors import FormatError, OutputError, UsageError, a_or_an
from ..formats import LazyTensor, open_checkpoint
from ..formats.dtypes import BY_NAME as DTYPES
from ..formats.dtypes import DType, torch_dtype
from ..formats.quantized import QuantizedTensor
from ..quant.ggml_types import BY_NAME as GGML
from .gguf_rules import ARCHITECTURES, TYPES, Rules, check_name, kept
from .inspect import identify_checkpoint
from .provenance import provenance, source_hashes

FP8_TYPE = "fp8-scaled"
BNB_TYPES = ("nf4", "fp4")  # --type -> bitsandbytes' quant_type (stored type: upper case)
SAFETENSORS_TYPES = (FP8_TYPE, *BNB_TYPES)
FP8_FORMATS = {  # --fp8 -> (safetensors dtype, largest finite value, comfy_quant format)
    "e4m3fn": ("F8_E4M3", 448.0, "float8_e4m3fn"),
    "e5m2": ("F8_E5M2", 57344.0, "float8_e5m2"),
}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, as the converters write it

# The largest relative RMS error a tensor may have, per stored type: twice what each type
# gives on Gaussian values (measured with ckptkit's quantizers on 2^20 N(0, 1) values, rows
# of 4,096: Q8_0 0.0054, Q6_K 0.0177, Q5_K 0.0361, Q5_1 0.0378, Q5_0 0.0427, Q4_K 0.0713,
# Q4_1 0.0783, Q4_0 0.0860, Q3_K 0.151, Q2_K 0.296, BF16 0.00166, F16 0.00021, fp8 e4m3fn
# 0.0231, e5m2 0.0461; bitsandbytes' blocks of 64 with double-quantised absmax: NF4 0.0920,
# FP4 0.122). Heavier tails cost more: Student's t with 3 degrees of freedom gives up to
# 1.5x these (Q4_0 0.125, NF4 0.111, FP4 0.170), so 2x leaves real weights room, while a
# broken block (a scale lost or overflowed, the white-image failure) gives an error near 1.
# F32 is exact.
ERROR_BOUNDS = {
    "Q8_0": 0.011, "Q6_K": 0.036, "Q5_K": 0.073, "Q5_1": 0.076, "Q5_0": 0.086,
    "Q4_K": 0.143, "Q4_1": 0.157, "Q4_0": 0.172, "Q3_K": 0.302, "Q2_K": 0.593,
    "BF16": 0.0034, "F16": 0.00043, "F32": 1e-7,
    "F8_E4M3": 0.047, "F8_E5M2": 0.093, "NF4": 0.184, "FP4": 0.244,
}
# Values quantized and checked at a time (a multiple of every block size): 256 K float32 values
# (1 MB) keep a slice's passes in a core's L2 cache; 1 M values were 15% slower, 64 K slower
# again (Python's per-call cost).
SLICE = 1 << 18


@dataclass
class TypeSummary:
    """The tensors stored as one type and their errors."""

    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    bound: float = 0.0
    mean_error: float = 0.0  # mean of the tensors' relative RMS errors
    max_error: float = 0.0
    worst: str = ""


@dataclass
class QuantizeReport:
    output: str
    type: str
    family: str | None
    architecture: str | None
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    bits_per_weight: float = 0.0
    types: dict[str, TypeSummary] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # tensor -> relative RMS error
    reshaped: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> why not the type asked
    left_out: list[str] = field(default_factory=list)  # components not written
    notes: list[str] = field(default_factory=list)


def quantize(src: str, out: str, qtype: str, *, fp8: str | None = None,
             progress: Progress | None = None, fsync: bool = True,
             hash_sources: bool = False) -> QuantizeReport:
    """``fp8`` is for ``fp8-scaled`` alone (default e4m3fn): given with another type it is
    refused rather than ignored, since the user expected it to change something.
    ``hash_sources``: the source's SHA-256 computed while quantizing, for the provenance
    (else recorded only when ckptkit already knows it), as the other operations do."""
    gguf = qtype in TYPES
    if not gguf and qtype not in SAFETENSORS_TYPES:
        raise UsageError(f"--type must be one of {', '.join(TYPES)}, "
                         f"{', '.join(SAFETENSORS_TYPES)}, not {qtype!r}")
    if qtype != FP8_TYPE and fp8 is not None:
        raise UsageError(f"--fp8 is for --type {FP8_TYPE}; --type {qtype} stores no fp8")
    fp8 = fp8 or "e4m3fn"
    if fp8 not in FP8_FORMATS:
        raise UsageError(f"--fp8 must be e4m3fn or e5m2, not {fp8!r}")
    wanted = ".gguf" if gguf else ".safetensors"
    if not out.lower().endswith(wanted):
        raise UsageError(f"--type {qtype} writes {wanted[1:]}: name the output *{wanted} "
                         "(loaders choose their reader by the extension)")
    check_output_path(out, (src,))
    with open_checkpoint(src) as checkpoint:
        tensors, report = _denoiser(checkpoint, src, out, qtype)
        arch = report.architecture
        meta = provenance("quantize", [src], source_hashes([src], hash_sources), type=qtype,
                          **({"fp8": fp8} if qtype == FP8_TYPE else {}))
        try:
            with _one_thread_per_op():
                if gguf:
                    _write_gguf(src, out, arch, qtype, tensors, meta, report, progress, fsync)
                elif qtype == FP8_TYPE:
                    _write_fp8(src, out, arch, fp8, tensors, meta, report, progress, fsync)
                else:
                    _write_bnb(src, out, arch, qtype, tensors, meta, report, progress, fsync)
        except FormatError as exc:  # a tensor's check, made where the file's name is unknown
            if exc.path is not None:
                raise
            raise type(exc)(exc.reason, src) from exc
        finally:  # the source's hashing stops if the run did (a no-op once it is done)
            for value in meta.values():
                if isinstance(value, Deferred):
                    value.cancel()
    _summarise(report)
    return report


def _denoiser(checkpoint, src: str, out: str, qtype: str):
    """The (name, tensor) pairs of the diffusion model to quantize and the report begun;
    refuses what ComfyUI-GGUF could not load."""
    ident = identify_checkpoint(checkpoint)
    comp = next((c for c in ident.components if c.name == "diffusion_model"), None)
    if comp is None or ident.family is None:
        raise UsageError(f"{src} holds no diffusion model ckptkit can quantize (it is "
                         f"{a_or_an(ident.describe())}); quantize takes a checkpoint or a "
                         "diffusion model of a known family")
    arch = ARCHITECTURES.get(ident.family)
    if qtype in TYPES and arch is None:
        raise UsageError(f"{src} is {a_or_an(ident.family)} model, which ComfyUI-GGUF has no "
                         "architecture for")
    if comp.layout == "diffusers":
        raise UsageError(
            f"{src} is {a_or_an(ident.family)} diffusion model in the diffusers layout (q, k "
            "and v split), which ComfyUI-GGUF's loaders do not read; make it the original "
            f"layout first (ckpt assemble --diffusion-model {src} --allow-partial -o "
            "ORIGINAL.safetensors), then quantize that")
    report = QuantizeReport(out, qtype, ident.family, arch)
    report.left_out = [c.name for c in ident.components if c.name != "diffusion_model"]
    tensors = []
    for key, tensor in checkpoint.items():
        if not key.startswith(comp.prefix):
            continue
        name = key[len(comp.prefix):]
        problem = check_name(name, tensor.shape)
        if problem:
            raise UsageError(f"{src}: tensor {name} cannot be quantized: {problem}")
        if not tensor.dtype.is_float:
            raise UsageError(f"{src}: tensor {name} holds {tensor.dtype.name} values, not "
                             "floating-point weights")
        tensors.append((name, tensor))
    # Errors are measured against what the source holds; a quantized source already lost
    # precision that no error here shows, and a higher type cannot bring it back.
    already = sorted({t.qtype for _, t in tensors if isinstance(t, QuantizedTensor)})
    if already:
        report.notes.append(
            f"{src} is already quantized ({', '.join(already)}): the errors above are "
            "against its dequantized values, not the original weights; quantize the "
            "original for the best file")
    return tensors, report


def _write_gguf(src, out, arch, qtype, tensors, meta, report, progress, fsync) -> None:
    rules = Rules(arch, qtype)
    metadata: dict = {"general.architecture": arch,
                      "general.quantization_version": QUANTIZATION_VERSION,
                      "general.file_type": TYPES[qtype][1]}
    planned = []
    checker = _Checker(report)
    for name, tensor in tensors:
        choice = rules.choose(name, tensor.shape, tensor.dtype.name,
                              lambda t: GGML[t].block_size)
        if choice.orig_shape is not None:
            metadata[f"comfy.gguf.orig_shape.{name}"] = list(choice.orig_shape)
            report.reshaped += 1
        if choice.note:
            report.fallbacks[name] = choice.note
        planned.append(GGUFTensor(name, choice.qtype, choice.shape,
                                  partial(_quantized, tensor, choice.qtype, name, checker)))
        checker.planned(choice.qtype, tensor.numel, GGML[choice.qtype].nbytes(tensor.numel))
    metadata.update(meta)
    write_gguf(out, metadata, planned, inputs=(src,), progress=progress, fsync=fsync,
               check=partial(_read_back, planned, metadata, out))


def _read_back(planned: list[GGUFTensor], metadata: dict, target: str, path: str) -> None:
    """The written file opened with ckptkit's GGUF reader (ggml's header rules) before it
    takes its name: every tensor there, in order, of its type and original shape."""
    from ..formats.gguf import ORIG_SHAPE, open_gguf
    from ..formats.source import Source

    source = Source(path)
    try:
        written = open_gguf(source).tensors
    except FormatError as exc:
        raise OutputError(f"the written file does not read back ({exc.reason})",
                          target) from None
    finally:
        source.close()
    same = list(written) == [t.name for t in planned] and all(
        (getattr(written[t.name], "qtype", "") or written[t.name].dtype.name) == t.qtype
        for t in planned) and all(
        written[t.name].shape == tuple(metadata.get(ORIG_SHAPE + t.name, t.shape))
        for t in planned)
    if not same:
        raise OutputError("the written file's header does not match what was planned", target)


def _quantized(tensor: LazyTensor, qtype: str, name: str, checker: _Checker, out) -> None:
    """Fills ``out`` with ``tensor`` stored as ``qtype``, a slice at a time (in parallel),
    each slice checked against the dequantized bytes just written."""
    from ..quant.dequant import dequantize
    from ..quant.encode import quantize_into

    read = _slice_reader(tensor)
    kind = GGML[qtype]

    def one(start: int) -> tuple[float, float]:
        x = read(start, min(SLICE, tensor.numel - start)).float()
        first, count = kind.nbytes(start), kind.nbytes(x.numel())
        stored = out[first:first + count]
        squared = _squared_sum(x, name)
        quantize_into(x, qtype, stored)
        back = dequantize(stored, qtype, (x.numel(),))
        return _squared_error(x, back, name, qtype, owned=qtype != "F32"), squared

    checker.record(name, qtype, _in_parallel(one, range(0, tensor.numel, SLICE)))


def _slice_reader(tensor: LazyTensor) -> Callable:
    """``read(start, count)``: ``count`` values of the tensor from flat index ``start``, as a
    private 1-D torch tensor read from the file on its own (pread: no pages of the input stay
    mapped in this process, and reads of slices in parallel overlap with the work). A tensor
    that is not plain contiguous bytes (a view into a pickle's storage, a quantized one) is
    read once and sliced."""
    if tensor.byte_rows:
        flat = replace(tensor, shape=(tensor.numel,), strides=None)
        return lambda start, count: flat.read_rows(start, start + count)
    values = tensor.read().reshape(-1)
    return lambda start, count: values[start:start + count]


def _squared_sum(x, name: str) -> float:
    """The sum of squares of a float32 slice of the source; refuses NaN and infinities (the
    sum is not finite when a value is not; a finite slice whose squares overflow is looked
    at value by value)."""
    import torch

    squared = float(torch.dot(x, x))
    if not math.isfinite(squared) and not bool(torch.isfinite(x).all()):
        raise FormatError(f"tensor {name}: its source holds NaN or infinite values; a "
                          "quantized copy of it would give broken images, so nothing was "
                          "written")
    return squared


def _squared_error(x, back, name: str, qtype: str, owned: bool = False) -> float:
    """The sum of squared differences between a slice and its dequantized copy (``back``:
    overwritten when ``owned``, else it may view the output file and is not changed);
    refuses a copy that is not finite."""
    import torch

    diff = back.sub_(x) if owned else back - x
    squared = float(torch.dot(diff, diff))
    if not math.isfinite(squared):
        raise FormatError(f"tensor {name}: its {qtype} copy holds NaN or infinite values "
                          f"(values beyond what {qtype} stores); nothing was written")
    return squared


def _in_parallel(job: Callable[[int], tuple[float, float]], starts) -> tuple[float, float]:
    """``job`` over every slice start, in a thread per core (torch releases the GIL), summed."""
    parts = _in_parallel_each(job, starts)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _in_parallel_each(job, starts) -> list:
    starts = list(starts)
    if len(starts) <= 1:
        return [job(s) for s in starts]
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(job, starts))


_WORKERS = 1


@contextmanager
def _one_thread_per_op():
    """Each torch op on one thread, slices in parallel instead: a slice's many small ops
    (a K-quant search runs hundreds on 64 K values) spend longer waking OpenMP workers than
    computing (8 ms a slice on one thread against 67 ms on two, on 2 busy cores). And the
    slices' temporaries (a few MB) taken from the heap rather than from fresh mappings (see
    ``engine.slices.heap_for_temporaries``)."""
    import torch

    global _WORKERS
    before = torch.get_num_threads()
    _WORKERS = max(1, min(before, os.cpu_count() or 1))
    torch.set_num_threads(1)
    try:
        with heap_for_temporaries():
            yield
    finally:
        torch.set_num_threads(before)
        _WORKERS = 1


class _Checker:
    """Per-tensor errors held to their bounds, and the per-type sums of the report."""

    def __init__(self, report: QuantizeReport):
        self.report = report
        self.lock = threading.Lock()

    def planned(self, qtype: str, parameters: int, nbytes: int) -> None:
        summary = self.report.types.setdefault(qtype, TypeSummary(bound=ERROR_BOUNDS[qtype]))
        summary.tensors += 1
        summary.parameters += parameters
        summary.bytes += nbytes

    def record(self, name: str, qtype: str, sums: tuple[float, float]) -> None:
        squared_error, squared = sums
        error = math.sqrt(squared_error / squared) if squared else (
            0.0 if squared_error == 0 else math.inf)
        bound = ERROR_BOUNDS[qtype]
        if not error <= bound:
            raise FormatError(f"tensor {name}: its {qtype} copy is off by {error:.4g} "
                              f"(relative RMS), over the {bound:g} that {qtype} gives values "
                              "of ordinary spread; nothing was written (its values are "
                              "unusual: try a wider type)")
        with self.lock:
            self.report.errors[name] = error
            summary = self.report.types[qtype]
            summary.mean_error += error / summary.tensors
            if error >= summary.max_error:
                summary.max_error, summary.worst = error, name


def _summarise(report: QuantizeReport) -> None:
    report.tensors = sum(s.tensors for s in report.types.values())
    report.parameters = sum(s.parameters for s in report.types.values())
    report.bytes = sum(s.bytes for s in report.types.values())
    report.bits_per_weight = 8 * report.bytes / report.parameters if report.parameters else 0.0
    if report.left_out:
        report.notes.append(f"left out {', '.join(report.left_out)}: the file holds the "
                            "diffusion model alone, as ComfyUI's diffusion-model loaders "
                            "read it")


def _write_fp8(src, out, arch, fp8, tensors, meta, report, progress, fsync) -> None:
    """ComfyUI's per-layer fp8: each 2-D ``.weight`` outside the family's kept layers
    becomes fp8 + ``weight_scale`` + ``comfy_quant``; every other tensor is copied."""
    dtype_name, largest, fmt = FP8_FORMATS[fp8]
    checker = _Checker(report)
    marker = json.dumps({"format": fmt}).encode("utf-8")  # ComfyUI writes json.dumps's bytes
    planned = []
    scales: dict[str, float] = {}
    for name, tensor in tensors:
        if not _is_linear_weight(arch, name, tensor):
            planned.append(_copied(name, tensor, checker))
            continue
        layer = name[:-len("weight")]
        fill = partial(_fp8_into, tensor, name, dtype_name, largest, scales, checker)
        planned += [
            Planned(name, DTYPES[dtype_name], tensor.shape,
                    partial(_filled, tensor.shape, DTYPES[dtype_name], fill), fill),
            Planned(layer + "weight_scale", DTYPES["F32"], (),
                    partial(_scale_of, scales, name)),
            Planned(layer + "comfy_quant", DTYPES["U8"], (len(marker),),
                    partial(bytes, marker)),
        ]
        checker.planned(dtype_name, tensor.numel, tensor.numel)
    write_safetensors(out, planned, meta, inputs=(src,),
                      progress=progress, fsync=fsync)


def _is_linear_weight(arch: str | None, name: str, tensor: LazyTensor) -> bool:
    """Whether fp8 and NF4 output quantize ``name``: the weight of a Linear layer (a 2-D
    ``.weight``; convolutions are 4-D) that the family's rules do not keep (``kept``: its
    embedders and final layer, as ComfyUI-GGUF keeps them)."""
    return (len(tensor.shape) == 2 and name.endswith(".weight") and tensor.numel > 0
            and not kept(arch, name))


def _copied(name: str, tensor: LazyTensor, checker: _Checker) -> Planned:
    """A tensor written as it is in the source."""
    from ..engine.moves import copy_range

    produce = partial(copy_range, tensor) if tensor.is_contiguous else tensor.read
    checker.planned(tensor.dtype.name if tensor.dtype.name in ERROR_BOUNDS else "F32",
                    tensor.numel, tensor.nbytes)
    return Planned(name, tensor.dtype, tensor.shape, produce)


def _filled(shape: tuple[int, ...], dtype: DType, fill: Callable):
    """A quantized weight in memory, where the output cannot be mapped (``fill`` writes it
    into the file's pages otherwise)."""
    import torch

    out = torch.empty(shape, dtype=torch_dtype(dtype))
    fill(out)
    return out


def _fp8_into(tensor: LazyTensor, name: str, dtype_name: str, largest: float,
              scales: dict[str, float], checker: _Checker, out) -> None:
    """The weight divided by its scale (max |w| / the format's largest value, float32),
    rounded to fp8 into ``out``; checked as stored x scale against the source."""
    import torch

    read = _slice_reader(tensor)
    flat = out.reshape(-1)
    starts = range(0, tensor.numel, SLICE)

    def largest_of(start: int) -> tuple[float, float]:
        x = read(start, min(SLICE, tensor.numel - start)).float()
        _squared_sum(x, name)
        return float(x.abs().amax()) if x.numel() else 0.0, 0.0

    amax = max((m for m, _ in _in_parallel_each(largest_of, starts)), default=0.0)
    scale = torch.tensor(amax / largest if amax else 1.0, dtype=torch.float32)
    scales[name] = float(scale)

    def one(start: int) -> tuple[float, float]:
        x = read(start, min(SLICE, tensor.numel - start)).float()
        part = flat[start:start + x.numel()]
        part.copy_((x / scale).clamp(-largest, largest))
        back = part.float().mul_(scale)
        return _squared_error(x, back, name, dtype_name, owned=True), float(torch.dot(x, x))

    checker.record(name, dtype_name, _in_parallel(one, starts))


def _scale_of(scales: dict[str, float], name: str):
    import torch

    return torch.tensor(scales[name], dtype=torch.float32)


# The longest text of a float (``repr``), for the quant state's room in the header: the
# nested offset is known only once the weight's absmax are, after the header is written.
_LONGEST_FLOAT = "-1.2345678901234567e-300"
_TORCH_NAMES = {"F16": "float16", "F32": "float32"}  # and bfloat16 for every other float


def _write_bnb(src, out, arch, kind, tensors, meta, report, progress, fsync) -> None:
    """bitsandbytes 4-bit as Forge loads it (``ForgeLoader4Bit``, through bitsandbytes'
    ``QuantState.from_dict``): each Linear weight outside the family's kept layers as
    ``quantize_4bit(blocksize=64, compress_statistics=True)`` stores it, its quant state
    packed as ``QuantState.as_dict(packed=True)`` packs it; every other tensor copied."""
    from ..quant import bnb4

    checker = _Checker(report)
    qtype = kind.upper()
    planned = []
    for name, tensor in tensors:
        if not _is_linear_weight(arch, name, tensor):
            planned.append(_copied(name, tensor, checker))
            continue
        weight = _Bnb4Weight(tensor, name, kind, checker)
        count = tensor.numel
        blocks = -(-count // bnb4.BLOCK)
        parts = [
            Planned(name, DTYPES["U8"], ((count + 1) // 2, 1),
                    partial(_filled, ((count + 1) // 2, 1), DTYPES["U8"], weight.fill),
                    weight.fill),
            Planned(name + ".absmax", DTYPES["U8"], (blocks,), weight.absmax),
            Planned(name + ".quant_map", DTYPES["F32"], (16,), partial(bnb4.table, kind)),
            Planned(name + ".nested_absmax", DTYPES["F32"], (-(-blocks // bnb4.NESTED_BLOCK),),
                    weight.nested_absmax),
            Planned(name + ".nested_quant_map", DTYPES["F32"], (256,), bnb4.dynamic_map),
            Planned(name + ".quant_state.bitsandbytes__" + kind, DTYPES["U8"],
                    (len(weight.state(_LONGEST_FLOAT)),), weight.packed_state),
        ]
        planned += parts
        checker.planned(qtype, count, sum(p.nbytes for p in parts))
    write_safetensors(out, planned, meta, inputs=(src,),
                      progress=progress, fsync=fsync)


class _Bnb4Weight:
    """One weight in bitsandbytes' 4-bit layout, made in two passes over the source: its
    blocks' absmax first (whichever of its tensors the writer asks for first: the file's
    order puts aligned tensors first), double-quantised; then its codes, written into the
    file's pages and checked a slice at a time (decoded from those pages with the stored
    absmax, as a reader decodes them)."""

    def __init__(self, tensor: LazyTensor, name: str, kind: str, checker: _Checker):
        self.tensor, self.name, self.kind, self.checker = tensor, name, kind, checker
        self.lock = threading.Lock()
        self.codes = self.nested = self.offset = None
        self.codes_wanted = 2  # by the weight's check and by its absmax tensor

    def _statistics(self) -> None:
        import torch

        from ..quant import bnb4

        with self.lock:
            if self.offset is not None:
                return
            read, count, name = _slice_reader(self.tensor), self.tensor.numel, self.name

            def absmax_of(start: int):
                x = read(start, min(SLICE, count - start)).float()
                _squared_sum(x, name)
                return bnb4.block_absmax(x)

            absmax = torch.cat(_in_parallel_each(absmax_of, range(0, count, SLICE)))
            self.codes, self.nested, self.offset = bnb4.compress_absmax(absmax)

    def _release_codes(self) -> None:
        with self.lock:
            self.codes_wanted -= 1
            if not self.codes_wanted:
                self.codes = None  # n/64 bytes a weight: not kept for the whole file

    def fill(self, out) -> None:
        """The packed codes into ``out`` (uint8, the weight's place in the file), each
        slice checked against the source."""
        import torch

        from ..quant import bnb4

        self._statistics()
        read, count, name, kind = _slice_reader(self.tensor), self.tensor.numel, self.name, \
            self.kind
        flat = out.reshape(-1)
        quant_map = bnb4.table(kind)
        nested_map = bnb4.dynamic_map()
        per_nested = bnb4.BLOCK * bnb4.NESTED_BLOCK  # values under one nested absmax

        def one(start: int) -> tuple[float, float]:
            x = read(start, min(SLICE, count - start)).float()
            stored = flat[start // 2:start // 2 + (x.numel() + 1) // 2]
            bnb4.encode(x, kind, stored)
            first = start // bnb4.BLOCK
            codes = self.codes[first:first + -(-x.numel() // bnb4.BLOCK)]
            nested = self.nested[start // per_nested:]
            absmax = bnb4.expand_absmax(codes, nested, self.offset, nested_map,
                                        bnb4.NESTED_BLOCK)
            back = bnb4.decode(stored, quant_map, absmax, bnb4.BLOCK, x.numel())
            return _squared_error(x, back, name, kind.upper()), float(torch.dot(x, x))

        try:
            self.checker.record(name, kind.upper(), _in_parallel(one, range(0, count, SLICE)))
        finally:
            self._release_codes()

    def absmax(self):
        self._statistics()
        codes = self.codes
        self._release_codes()
        return codes

    def nested_absmax(self):
        self._statistics()
        return self.nested

    def state(self, offset: str) -> bytes:
        """The quant state as bitsandbytes packs it (``json.dumps`` of ``as_dict``'s
        non-tensor items, in its order), with ``offset`` as the nested offset's text."""
        described = json.dumps({
            "quant_type": self.kind, "blocksize": 64,
            "dtype": _TORCH_NAMES.get(self.tensor.dtype.name, "bfloat16"),
            "shape": list(self.tensor.shape), "nested_blocksize": 256,
            "nested_dtype": "float32"})
        return f'{described[:-1]}, "nested_offset": {offset}}}'.encode()

    def packed_state(self) -> bytes:
        """The quant state with the offset found, padded with spaces (JSON allows them after
        the value) to the room planned for it."""
        self._statistics()
        room = len(self.state(_LONGEST_FLOAT))
        return self.state(json.dumps(self.offset)).ljust(room)
