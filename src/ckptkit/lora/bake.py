"""``lora bake``: LoRAs applied to a model's weights, streamed, one output tensor at a time.

The model is any file ckptkit reads (monolithic, a diffusion model or text encoder alone, in
any layout; pickles through the safe reader) and the LoRAs any format and adapter type
``lora.modules`` reads. Each LoRA's modules are matched against the model's header
(``lora.targets``) before anything is read: a module that lands nowhere refuses the bake,
naming each group of such modules with its reason (what ``ckpt lora check`` says), unless
``allow_unmatched``. Then every tensor of the model is planned: one that no module touches
is copied file to file (or cast a slice at a time); one that modules touch is read once,
widened to fp32, patched by every module of every LoRA that lands on it, in the order the
LoRAs were given (``lora.adapters``: a module may land on rows of a fused weight, and a
fused module's rows on separate weights), then cast, values beyond the output dtype's range
clamped and counted, and written straight into the output file's pages.

The output's metadata keeps the model's own (less the hashes of its bytes) and names each
LoRA with its SHA-256 (hashed while the bake runs), strengths and modules applied.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..arch.detect import MARKERS
from ..engine.atomic import check_output_path
from ..engine.moves import copy_range
from ..engine.slices import may_exceed
from ..engine.writer import Deferred, Planned, Progress, write_safetensors
from ..errors import CkptError, FormatError, UsageError, a_or_an, counted
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import DType, torch_dtype
from ..ops.hashing import BackgroundSha256, cached_sha256
from ..ops.inspect import identify_checkpoint
from ..ops.provenance import inherited, provenance
from ..ops.prune import LIMITS, cast_targets, clamped_cast, parse_dtype
from .adapters import AdapterError, by_rows, patch, patch_bias, scale, split_problem
from .keys import DIFFUSION_MODEL
from .modules import Module, delta_size, read_lora
from .modules import alpha as module_alpha
from .specs import split_numbers
from .targets import REASONS, Target, Unmatched, bias_key, match

CHUNK = 1 << 20  # elements of a weight patched at a time where the changes allow (4 MiB fp32)


class NotApplied(CkptError):
    """Some module of a LoRA lands nowhere in the model: the bake is refused (as ``lora
    check`` exits 1 when some module does not apply). ``groups``: per LoRA file, its groups
    of modules that land nowhere (reason, why, detail, modules, example)."""

    exit_code = 1

    def __init__(self, message: str, path: str | None = None,
                 groups: list[dict[str, Any]] | None = None):
        super().__init__(message, path)
        self.groups = groups or []


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to bake: its file, its strength and the text encoders' strength."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None  # None: the same as ``strength``

    @property
    def te(self) -> float:
        return self.strength if self.te_strength is None else self.te_strength


def parse_spec(text: str) -> LoraSpec:
    """``LORA[:STRENGTH[:TE_STRENGTH]]`` (see ``specs.split_numbers``)."""
    path, numbers = split_numbers(text, 2, "STRENGTH[:TE_STRENGTH]")
    return LoraSpec(path, *numbers)


@dataclass
class LoraReport:
    file: str
    format: str
    family: str | None
    strength: float
    te_strength: float
    modules: int
    applied: int = 0
    unmatched: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BakeReport:
    family: str | None
    layout: str | None
    loras: list[LoraReport] = field(default_factory=list)
    patched: int = 0  # tensors changed
    copied: int = 0  # tensors written unchanged (or only cast)
    cast: int = 0
    clamped: dict[str, int] = field(default_factory=dict)  # key -> values clamped
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Apply:
    """One module's change to one model tensor: ``rows`` of the tensor (None: all), the
    module's ``delta`` rows landing there (None: all) of its ``out`` rows."""

    lora: str
    module: Module
    tensors: dict[str, LazyTensor]  # role -> the LoRA's tensor (alpha and diff_b aside)
    alpha: float | None
    strength: float
    rows: tuple[int, int] | None
    delta: tuple[int, int] | None
    out: int | None
    bias_scale: float = 1.0  # for a bias target: the scale of the module's diff_b


def bake(model: str, loras: list[LoraSpec], out: str, *, dtype: str | None = None,
         vae_dtype: str | None = None, allow_unmatched: bool = False, hash_model: bool = False,
         progress: Progress | None = None, fsync: bool = True) -> BakeReport:
    """Writes ``model`` with ``loras`` baked in to ``out``; refuses, before anything is
    written, when a module lands nowhere (unless ``allow_unmatched``)."""
    if not loras:
        raise UsageError("lora bake needs at least one LoRA")
    target, vae_target = parse_dtype(dtype, "--dtype"), parse_dtype(vae_dtype, "--vae-dtype")
    paths = [model, *[spec.path for spec in loras]]
    check_output_path(out, tuple(paths))
    with ExitStack() as stack:
        checkpoint = stack.enter_context(open_checkpoint(model))
        ident = identify_checkpoint(checkpoint)
        if ident.kind not in ("checkpoint", "diffusion-model", "text-encoder"):
            raise UsageError(f"{model} is {a_or_an(ident.describe())}, not a model to bake a "
                             "LoRA into (a checkpoint, a diffusion model or a text encoder)")
        report = BakeReport(ident.family, ident.layout)
        applies: dict[str, list[_Apply]] = {}
        for spec in loras:
            lora = stack.enter_context(open_checkpoint(spec.path))
            report.loras.append(_plan_lora(spec, lora, [(checkpoint, ident, applies)]))
        _refuse_unmatched(report, model, allow_unmatched)
        wanted_for, note = cast_targets(ident, target, vae_target)
        if note:
            report.notes.append(note)
        planned = _plan(checkpoint, applies, wanted_for, report)
        known = {} if hash_model else {model: cached_sha256(model)}
        hashing = BackgroundSha256([p for p in paths if p not in known])
        metadata = {**inherited(checkpoint.metadata),
                    **provenance("lora bake", paths, _hashes(paths, known, hashing),
                                 dtype=dtype or "", vae_dtype=vae_dtype or "",
                                 allow_unmatched=allow_unmatched),
                    "ckptkit.loras": _loras_record(report, known, hashing)}
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                          fsync=fsync)
    return report


# --- metadata ------------------------------------------------------------------------------

_PENDING = "0" * 64  # a SHA-256 not known yet: as long as the one that replaces it


def _sha(path: str, known: dict[str, str | None], found: dict[str, str | None] | None):
    if path in known:
        return known[path]
    return _PENDING if found is None else found.get(path)


def _hashes(paths: list[str], known: dict[str, str | None], hashing: BackgroundSha256
            ) -> Deferred:
    """The sources' SHA-256 (``ckptkit.sources_sha256``): the LoRAs' hashed while the bake
    runs, the model's only when asked (``hash_model``) or already known."""
    def render(found):
        return json.dumps([_sha(p, known, found) for p in paths])

    return Deferred(render(None), lambda: render(hashing.result()), hashing.cancel)


def _loras_record(report: BakeReport, known: dict[str, str | None],
                  hashing: BackgroundSha256) -> Deferred:
    """``ckptkit.loras``: each LoRA's file name, SHA-256, key format, strengths and the
    modules applied."""
    def render(found):
        return json.dumps([{"file": os.path.basename(r.file), "sha256": _sha(r.file, known, found),
                            "format": r.format, "strength": r.strength,
                            "te_strength": r.te_strength, "modules": r.modules,
                            "applied": r.applied} for r in report.loras])

    return Deferred(render(None), lambda: render(hashing.result()), hashing.cancel)


# --- planning ------------------------------------------------------------------------------


def _plan_lora(spec: LoraSpec, lora: Checkpoint,
               models: list[tuple[Checkpoint, Any, dict[str, list[_Apply]]]]) -> LoraReport:
    """Matches the LoRA's modules against each model file (checkpoint, identification, the
    changes planned for it): a module lands in every file it matches and is unmatched only
    when it matches none (``load_pipeline`` gives a model as several files; a bake, one)."""
    found = read_lora(lora)
    info = found.analysis.info
    report = LoraReport(spec.path, found.format, info.family, spec.strength, spec.te,
                        len(found.modules))
    matchings = [match(found.modules, model, info.family, ident) for model, ident, _ in models]
    landed = {name for m in matchings for name in m.targets}
    unmatched = []
    for group in matchings[0].unmatched:
        left = [n for n in group.modules if n not in landed]
        if left:
            example = group.example if group.example and group.modules[0] in left else ""
            unmatched.append(Unmatched(group.reason, group.detail, left, example))
    for module in found.modules:
        places = [(m.targets[module.name], applies) for m, (_, _, applies)
                  in zip(matchings, models, strict=True) if module.name in m.targets]
        if not places:
            continue
        problem = next(filter(None, (_split_problem(module, t) for t, _ in places)), None)
        if problem:
            _add_unmatched(unmatched, module.name, "other-layout", problem)
            continue
        strength = spec.strength if module.component == DIFFUSION_MODEL else spec.te
        report.applied += 1
        if strength == 0:  # ComfyUI does not load a LoRA at strength 0: nothing changes
            continue
        for targets, applies in places:
            _plan_module(spec.path, lora, module, targets, strength, applies)
    report.unmatched = [{"reason": u.reason, "why": REASONS[u.reason], "detail": u.detail,
                         "modules": len(u.modules), "example": u.example or u.modules[0]}
                        for u in unmatched]
    return report


def _split_problem(module: Module, targets: tuple[Target, ...]) -> str | None:
    for t in targets:
        if t.delta_rows is not None:
            problem = split_problem(module.adapter, module.shapes, t.delta_rows)
            if problem:
                return (f"the model stores this layer as separate weights, and {problem}")
    return None


def _add_unmatched(groups: list[Unmatched], name: str, reason: str, detail: str) -> None:
    for group in groups:
        if (group.reason, group.detail) == (reason, detail):
            group.modules.append(name)
            return
    groups.append(Unmatched(reason, detail, [name]))


def _plan_module(path: str, lora: Checkpoint, module: Module, targets: tuple[Target, ...],
                 strength: float, applies: dict[str, list[_Apply]]) -> None:
    alpha = module_alpha(module, lora)
    tensors = {role: lora[key] for role, key in module.keys.items()
               if role not in ("alpha", "diff_b")}
    out = _module_rows(module)
    for t in targets:
        if tensors:
            applies.setdefault(t.key, []).append(
                _Apply(path, module, tensors, alpha, strength, t.rows, t.delta_rows, out))
        if "diff_b" in module.keys:
            bias = {"diff_b": lora[module.keys["diff_b"]]}
            # a LoRA's lora_B.bias is scaled with its weights (PEFT), a bias difference
            # (.diff_b, .b_norm) is not (ComfyUI)
            lora_bias = module.keys["diff_b"].endswith("lora_B.bias") and "down" in module.shapes
            k = scale(alpha, module.shapes["down"][0]) if lora_bias else 1.0
            applies.setdefault(bias_key(t), []).append(
                _Apply(path, module, bias, None, strength, t.rows, t.delta_rows, out, k))


def _module_rows(module: Module) -> int | None:
    try:
        return delta_size(module)[0]
    except (ValueError, KeyError, IndexError):
        return None


def _refuse_unmatched(report: BakeReport, model: str, allow: bool,
                      done: tuple[str, str] = ("written", "--allow-unmatched bakes")) -> None:
    """Refuses when a module lands nowhere (unless ``allow``) or none lands anywhere;
    ``done``: what was not done, and the option that does it for the others."""
    groups = [(r, u) for r in report.loras for u in r.unmatched]
    applied = sum(r.applied for r in report.loras)
    if groups and not allow:
        said = "; ".join(f"{os.path.basename(r.file)}: {counted(u['modules'], 'module')} "
                         f"({u['why']}: {u['detail']}; e.g. {u['example']})"
                         for r, u in groups)
        raise NotApplied(f"some modules land nowhere in {model}, so nothing was {done[0]}: "
                         f"{said}; {done[1]} the others",
                         groups=[{"lora": r.file, **u} for r, u in groups])
    if applied == 0:
        raise NotApplied(f"no module of the LoRAs lands in {model}; nothing was {done[0]}")
    for r, u in groups:
        report.notes.append(f"{os.path.basename(r.file)}: {counted(u['modules'], 'module')} "
                            f"left out ({u['why']}: {u['detail']})")


def _plan(checkpoint: Checkpoint, applies: dict[str, list[_Apply]], wanted_for,
          report: BakeReport) -> list[Planned]:
    planned = []
    for key, tensor in checkpoint.items():
        castable = tensor.dtype.is_float and tensor.dtype.bits >= 8 and key not in MARKERS
        out_dtype = (wanted_for(key) if castable else None) or tensor.dtype
        if out_dtype != tensor.dtype:
            report.cast += 1
        changes = applies.get(key)
        if changes:
            report.patched += 1
            work = partial(_baked, key, tensor, changes, out_dtype, report.clamped)
            planned.append(Planned(key, out_dtype, tensor.shape, work, work))
            continue
        report.copied += 1
        if out_dtype != tensor.dtype:
            produce = partial(clamped_cast, tensor, out_dtype, key, report.clamped)
        elif tensor.is_contiguous:
            produce = partial(copy_range, tensor)
        else:
            produce = tensor.read
        planned.append(Planned(key, out_dtype, tensor.shape, produce))
    return planned


# --- baking one tensor ---------------------------------------------------------------------


def _baked(key: str, tensor: LazyTensor, changes: list[_Apply], out_dtype: DType,
           clamped: dict[str, int], out=None):
    """The tensor with every change applied in fp32, cast to ``out_dtype`` (into ``out``,
    the output file's pages, when given)."""
    import torch

    result = out if out is not None else torch.empty(tensor.shape,
                                                     dtype=torch_dtype(out_dtype))
    outside = patch_rows(key, tensor, changes, result, limit=LIMITS.get(out_dtype.name))
    if outside:
        clamped[key] = outside
    return None if out is not None else result


def patch_rows(key: str, tensor: LazyTensor, changes: list[_Apply], out,
               rows: tuple[int, int] | None = None, limit: float | None = None) -> int:
    """Rows ``rows`` (None: all) of the model tensor with every change applied in fp32, in
    the order given, cast into ``out`` (those rows' own storage: a bake's output pages, a
    loaded module's parameter); values beyond ``limit`` are clamped and their number
    returned. The tensor is read once; where every change can be made a block of rows at a
    time (``adapters.by_rows``: plain LoRA, LoHa, row-wise DoRA... the common case), it is,
    in blocks of ``CHUNK`` elements: each block's fp32 copy stays in the cache while it is
    patched, checked and cast (on SDXL's weights several times faster than whole-tensor
    passes, and no fp32 copy of the whole weight)."""
    import torch

    parts = [(c, {role: _fp32(c.module, role, lazy) for role, lazy in c.tensors.items()})
             for c in changes]
    source = tensor.load() if tensor.is_contiguous else tensor.read()
    if source.dim() == 0:  # a weight of one value: as one row
        source = source.reshape(1)
    total = source.shape[0]
    first, last = rows or (0, total)
    target = out.reshape(last - first, *source.shape[1:])
    rowwise = all("diff_b" in t or by_rows(c.module.adapter, c.module.shapes)
                  for c, t in parts)
    step = max(1, CHUNK // max(1, source[0].numel())) if rowwise else last - first
    outside = 0
    for start in range(first, last, step):
        stop = min(start + step, last)
        # a copy even when the model is fp32: the view of the mapped file is not ours to
        # patch (its pages are copy-on-write: other readers of the map would see it)
        block = source[start:stop].to(torch.float32, copy=True)
        for change, t in parts:
            try:
                block = _apply(block, start, stop, total, change, t)
            except AdapterError as exc:
                raise FormatError(f"module {change.module.name} cannot be applied to {key}: "
                                  f"{exc}", change.lora) from None
        if limit is not None and may_exceed(block, limit):
            outside += int((block.abs() > limit).sum())
            block.clamp_(-limit, limit)
        target[start - first:stop - first].copy_(block)
    return outside


def _apply(block, start: int, stop: int, total: int, change: _Apply, t):
    """``block`` (fp32 rows ``start:stop`` of a weight of ``total`` rows) with one module's
    change to those rows made: the rows where the change lands, and the module's own rows
    they take (None when it is all of them)."""
    a, b = change.rows or (0, total)
    lo, hi = max(a, start), min(b, stop)
    if lo >= hi:
        return block
    d0 = change.delta[0] if change.delta else 0
    whole = (lo, hi) == (a, b) and change.delta is None
    module_rows = None if whole else slice(d0 + lo - a, d0 + hi - a)
    local = slice(lo - start, hi - start)
    if "diff_b" in t:
        new = patch_bias(block[local], t["diff_b"], change.strength, module_rows,
                         change.bias_scale)
    else:
        out = change.out if change.out is not None else b - a
        new = patch(change.module.adapter, block[local], t, change.alpha, change.strength,
                    module_rows, out)
    _refuse_non_finite(new, block[local], change)
    if (lo, hi) == (start, stop):
        return new  # the whole block: no copy back
    block[local] = new
    return block


def _refuse_non_finite(new, old, change: _Apply) -> None:
    """A module that turns finite weights into NaN or infinity (a LoRA broken in training,
    or an alpha of 0 on NaN factors) would bake black images; it is refused, and the
    output, written to a temporary file until the end, never appears. Values the model
    already held as NaN are not the module's doing."""
    import torch

    # A sum is non-finite when any term is, so a finite one clears the block in one pass
    # without a mask; only a non-finite sum (or an overflow of a finite one) looks closer.
    if torch.isfinite(new.sum()) or torch.isfinite(new[torch.isfinite(old)]).all():
        return
    raise FormatError(f"module {change.module.name} turns finite weights into NaN or "
                      "infinity (its tensors hold such values); nothing was written",
                      change.lora)


_PEFT_MAGNITUDE = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


def _fp32(module: Module, role: str, lazy: LazyTensor):
    """A LoRA tensor in fp32; PEFT's DoRA magnitude flattened, as the adapter math takes it
    (always per output row, but (1, out, 1, 1) on a convolution, which its shape alone does
    not tell from a per-input-column (1, in, 1, 1))."""
    value = lazy.read().float()
    if role == "dora_scale" and module.keys[role].endswith(_PEFT_MAGNITUDE):
        return value.reshape(-1)
    return value
