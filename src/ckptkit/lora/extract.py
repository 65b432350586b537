"""``lora extract``: the difference of two models of one family as a LoRA (LoCon for
convolutions), one module at a time.

Both models are identified first and must be of one family; each may come in any layout a
file holds (a monolithic checkpoint, a ComfyUI, kohya or diffusers component file): their
weights are compared under the component's canonical names. A first pass reads each
module's two weights and measures their difference (its largest entry and Frobenius norm),
so that the output's header can be planned before anything is decomposed: modules that did
not change are left out, and so is a text encoder whose weights all moved by at most
``MIN_DIFF`` (kohya's ``min_diff``: fine-tunes that did not train it still round it
differently). Then each module's difference is read again, decomposed (``lowrank.top_svd``:
a randomized range finder, as accurate as a full SVD truncated to the same rank within a
fraction of a percent, at a small part of its cost), written and released. With a dynamic
rank rule the ranks are known only once every module is decomposed: the factors (the
output, a few hundred MB at most) are held until then.

The LoRA is stored kohya's way: down (r x in[, k, k]) = Vᵀ, up (out x r[, 1, 1]) = U·S,
alpha = r (scale 1), without kohya's clamping of the factors to their 99th percentile
(which makes the truncation less exact). The share of each component's difference the LoRA
keeps (Frobenius: ‖kept‖ / ‖W_tuned - W_base‖ over the weights a LoRA can hold) is reported.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..arch import diffusers_layout
from ..arch.detect import Identification
from ..arch.families import DIFFUSION_MODEL, VAE, Family, component_name, families
from ..arch.layouts import Move, standalone_current_names, to_canonical
from ..engine.atomic import check_output_path
from ..engine.moves import read_moved
from ..engine.writer import Deferred, Planned, Progress, write_safetensors
from ..errors import UsageError, a_or_an
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import CLI_NAMES, DType, torch_dtype
from ..ops.inspect import identify_checkpoint
from ..ops.provenance import provenance, source_hashes
from . import lowrank
from .names import FORMATS, Named, module_names

DTYPES = ("fp16", "bf16", "fp32")  # what loaders take for a LoRA's factors
MIN_DIFF = 0.01  # kohya extract_lora_from_models.py: a text encoder that moved less is "the same"
# The down and up tensors' names: kohya's (which ComfyUI's LoraSave writes too), PEFT's for
# diffusers (``save_lora_weights``), which stores no alpha.
_LEAVES = {"kohya": (".lora_down.weight", ".lora_up.weight"),
           "comfyui": (".lora_down.weight", ".lora_up.weight"),
           "diffusers": (".lora_A.weight", ".lora_B.weight")}
_MODELS = ("checkpoint", "diffusion-model", "text-encoder")
# kohya's ss_base_model_version and ss_network_module by family (sd-scripts model_util,
# sdxl_model_util, flux_utils, sd3_utils; networks/lora*.py).
_SS_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0",
               "flux1-dev": "flux1", "flux1-schnell": "flux1", "sd3-medium": "medium",
               "sd3.5-medium": "5-medium", "sd3.5-large": "5-large"}
_SS_MODULE = {"flux1-dev": "networks.lora_flux", "flux1-schnell": "networks.lora_flux",
              "sd3-medium": "networks.lora_sd3", "sd3.5-medium": "networks.lora_sd3",
              "sd3.5-large": "networks.lora_sd3"}
# Weights a LoRA cannot stand for: lookup tables (token, position and T5 embeddings), not
# products with an input; CLIP's final projection, which no loader targets.
_NOT_LAYERS = ("embedding.weight", "embed_tokens.weight", "shared.weight", "text_projection",
               "positional_embedding", "position_embedding")


@dataclass
class ExtractReport:
    family: str
    modules: int = 0
    ranks: dict[str, int] = field(default_factory=dict)  # "min"/"max" of the ranks written
    # component -> share of its difference (Frobenius) the LoRA keeps
    retained: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # component -> why
    unchanged_modules: int = 0
    unnamed: int = 0  # layers the output format has no name for (left out)
    # changed tensors a LoRA cannot hold (biases, norms, embeddings), by component
    not_held: dict[str, int] = field(default_factory=dict)
    # changed k x k convolutions --conv-rank 0 leaves out, by component (not in ``retained``)
    convs_left_out: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pair:
    """One module's weight in both models, under the component's canonical name."""

    component: str
    key: str
    base: Callable[[], Any]
    tuned: Callable[[], Any]
    shape: tuple[int, ...]
    max_abs: float = 0.0
    norm_sq: float = 0.0
    rank: int = 0
    kept_sq: float = 0.0
    factors: tuple[Any, Any] | None = None
    named: tuple[Named, ...] = ()  # the output modules (``names.module_names``)


@dataclass(frozen=True)
class Options:
    rank: int
    conv_rank: int | None = None  # None: as --rank; 0: k x k convolutions left out
    dynamic: str | None = None
    value: float | None = None
    components: tuple[str, ...] | None = None
    fmt: str = "kohya"
    dtype: str = "fp16"
    device: str = "cpu"

    def check(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, not {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 0:
            raise UsageError(f"--conv-rank must be 0 (leave k x k convolutions out) or more, "
                             f"not {self.conv_rank}")
        if self.fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {self.fmt!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.dynamic is None:
            if self.value is not None:
                raise UsageError("--value goes with --dynamic")
            return
        if self.dynamic not in lowrank.EXTRACT_RULES:
            raise UsageError(f"--dynamic must be one of {', '.join(lowrank.EXTRACT_RULES)}, "
                             f"not {self.dynamic!r}")
        if self.value is None or not math.isfinite(self.value):
            raise UsageError(f"--dynamic {self.dynamic} needs --value V")
        if self.dynamic == "threshold" and self.value < 0:
            raise UsageError("--dynamic threshold: --value must be 0 or more")
        if self.dynamic != "threshold" and not 0 < self.value <= 1:
            raise UsageError(f"--dynamic {self.dynamic}: --value must be in (0, 1]")


def extract(base: str, tuned: str, out: str, options: Options, *,
            progress: Progress | None = None, fsync: bool = True,
            hash_sources: bool = False) -> ExtractReport:
    """Writes the LoRA of ``tuned`` - ``base`` to ``out``; returns what it holds."""
    options.check()
    check_output_path(out, (base, tuned))
    device = _device(options.device)
    with ExitStack() as stack:
        opened = [stack.enter_context(open_checkpoint(p)) for p in (base, tuned)]
        idents = [identify_checkpoint(c) for c in opened]
        fam = _family(base, tuned, idents)
        report = ExtractReport(fam.id)
        pairs = _pairs(fam, (base, tuned), opened, idents, options, report)
        _measure(pairs, device, progress)
        pairs = _changed(pairs, report)
        if not pairs:
            raise UsageError(f"{tuned} does not differ from {base} in any weight a LoRA can "
                             "hold: there is nothing to extract")
        if options.dynamic:
            for pair in pairs:
                _decompose(pair, options, device)
        else:
            for pair in pairs:
                pair.rank = _cap(pair, options)
        planned = [p for pair in pairs for p in _planned(pair, options, device)]
        report.modules = len(pairs)
        metadata = {**_kohya_metadata(fam, pairs, options),
                    **provenance("lora extract", [base, tuned],
                                 source_hashes([base, tuned], hash_sources),
                                 rank=str(options.rank), conv_rank=str(_conv_rank(options)),
                                 dynamic=options.dynamic or "", value=str(options.value or "")),
                    "ckptkit.retained": _retained_later(pairs, report)}
        write_safetensors(out, planned, metadata, inputs=(base, tuned), progress=progress,
                          fsync=fsync)
    return report


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:N], not {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch finds no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], not {name!r}")
    return device


def _family(base: str, tuned: str, idents: list[Identification]) -> Family:
    for path, ident in zip((base, tuned), idents, strict=True):
        if ident.kind not in _MODELS:
            raise UsageError(f"{path} is {a_or_an(ident.describe())}, not a model to extract "
                             "a LoRA from")
    ids = [set([i.family] if i.family else i.compatible_families) for i in idents]
    common = ids[0] & ids[1]
    if not common:
        raise UsageError(f"{base} is {a_or_an(idents[0].describe())} and {tuned} "
                         f"{a_or_an(idents[1].describe())}: a LoRA is the difference of two "
                         "models of one family")
    if len(common) > 1:
        raise UsageError(f"{base} and {tuned} fit several families ({', '.join(sorted(common))})"
                         ": extract from the checkpoints or diffusion models, which say which")
    return families()[common.pop()]


def _canonical(fam: Family, checkpoint: Checkpoint, ident: Identification
               ) -> dict[str, dict[str, Move]]:
    """Component -> canonical name -> the move that reads it from this file, for the
    components the file holds (not the VAE), in whatever layout it comes."""
    found: dict[str, dict[str, Move]] = {}
    keys = set(checkpoint)
    for report in ident.components:
        if report.name == VAE or report.name not in fam.component_names:
            continue
        comp = fam.component(report.name)
        tiny = report.size == "tiny"
        if report.layout == "ldm":
            moves = to_canonical(comp, keys)[0]
        elif report.layout == "comfyui":
            moves = [Move(v, (k,)) for k, v in standalone_current_names(comp, keys).items()]
        else:
            renamed = report.layout == "diffusers" or diffusers_layout.kohya_renames(fam)
            prefix = report.prefix
            named = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
            if renamed:
                moves = [Move(m.target, tuple(named[s] for s in m.sources), m.op, m.index,
                              m.parts, m.value, m.sizes, m.shape)
                         for m in diffusers_layout.from_diffusers(fam, comp.name, tiny,
                                                                  set(named))]
            else:
                moves = [Move(k, (v,)) for k, v in named.items()]
        found[report.name] = {m.target: m for m in moves if m.op != "scalar"}
    return found


def _is_layer(key: str, shape: tuple[int, ...]) -> bool:
    return key.endswith(".weight") and len(shape) in (2, 4) and not key.endswith(_NOT_LAYERS)


def _pairs(fam: Family, paths: tuple[str, str], opened: list[Checkpoint],
           idents: list[Identification], options: Options, report: ExtractReport
           ) -> list[_Pair]:
    views = [_canonical(fam, c, i) for c, i in zip(opened, idents, strict=True)]
    shared = [n for n in fam.component_names if n in views[0] and n in views[1]]
    wanted = [component_name(n) for n in options.components] if options.components else None
    if wanted:
        absent = [n for n in wanted if n not in shared]
        if absent:
            raise UsageError(f"--components {absent[0]}: not in both models (they share "
                             f"{', '.join(shared) or 'no component'})")
        shared = [n for n in shared if n in wanted]
    for name in set(views[0]) ^ set(views[1]):
        holder = paths[0] if name in views[0] else paths[1]
        report.left_out[name] = f"only in {holder}"
    pairs = []
    for name in shared:
        a, b = views[0][name], views[1][name]
        skipped = []
        for key in sorted(set(a) & set(b)):
            ta, tb = _tensor(opened[0], a[key]), _tensor(opened[1], b[key])
            if ta is None or tb is None or not ta.dtype.is_float:
                continue
            shape_a, shape_b = _shape(opened[0], a[key]), _shape(opened[1], b[key])
            if shape_a != shape_b:
                raise UsageError(f"{key} of the {name} is {list(shape_a)} in {paths[0]} but "
                                 f"{list(shape_b)} in {paths[1]}: these are not one model")
            if not _is_layer(key, shape_a):
                continue
            if len(shape_a) == 4 and shape_a[2:] != (1, 1) and _conv_rank(options) == 0:
                skipped.append(key)
                continue
            named = _named(fam, name, key, shape_a[0], options.fmt)
            if named is None:
                report.unnamed += 1
                continue
            pairs.append(_Pair(name, key, partial(read_moved, a[key], opened[0]),
                               partial(read_moved, b[key], opened[1]), shape_a, named=named))
        layers = {p.key for p in pairs if p.component == name} | set(skipped)
        report.not_held[name] = _count_changed(
            opened, a, b, [k for k in sorted(set(a) & set(b)) if k not in layers])
        if skipped:  # told apart: these are layers a LoRA could hold, left out on request
            report.convs_left_out[name] = _count_changed(opened, a, b, skipped)
    return pairs


def _tensor(checkpoint: Checkpoint, move: Move) -> LazyTensor | None:
    return checkpoint.get(move.sources[0]) if move.sources else None


def _shape(checkpoint: Checkpoint, move: Move) -> tuple[int, ...]:
    """The shape a move gives (a reshape, rows of a fused tensor, a plain copy)."""
    source = checkpoint[move.sources[0]].shape
    if move.op == "reshape":
        return tuple(move.shape)
    if move.op == "rows":
        start, stop = move.row_range(source[0])
        return (stop - start, *source[1:])
    if move.op == "concat":
        return (sum(checkpoint[s].shape[0] for s in move.sources), *source[1:])
    if move.op == "transpose":
        return tuple(reversed(source))
    return tuple(source)


def _count_changed(opened: list[Checkpoint], a: dict[str, Move], b: dict[str, Move],
                   keys: list[str]) -> int:
    """How many of the float tensors ``keys`` differ (those outside the LoRA's layers:
    biases, norms, embeddings the LoRA cannot carry; the convolutions --conv-rank 0 leaves
    out), told to the user. Compared as bytes, where they are the same in both files (one
    layout, one dtype); else as values."""
    import torch

    count = 0
    for key in keys:
        ta, tb = _tensor(opened[0], a[key]), _tensor(opened[1], b[key])
        if ta is None or tb is None or not ta.dtype.is_float:
            continue
        if a[key].op == b[key].op == "copy" and ta.dtype == tb.dtype:
            count += ta.raw() != tb.raw()
        else:
            count += not torch.equal(read_moved(a[key], opened[0]).float(),
                                     read_moved(b[key], opened[1]).float())
    return count


def _difference(pair: _Pair, device) -> Any:
    """W_tuned - W_base in fp32 on ``device``, as the matrix a LoRA factors."""
    import torch

    delta = pair.tuned().to(device, torch.float32)
    delta.sub_(pair.base().to(device))
    return lowrank.as_matrix(delta)


def _measure(pairs: list[_Pair], device, progress: Progress | None) -> None:
    """The first pass: each module's largest change and squared Frobenius norm."""
    if progress:
        progress.start(sum(2 * math.prod(p.shape) * 2 for p in pairs), len(pairs))
    for pair in pairs:
        delta = _difference(pair, device)
        pair.max_abs = float(delta.abs().max())
        pair.norm_sq = float(delta.double().pow(2).sum())
        del delta
        if progress:
            progress.update(2 * math.prod(pair.shape) * 2, 1)


def _changed(pairs: list[_Pair], report: ExtractReport) -> list[_Pair]:
    """The modules to extract: those that changed, in components that changed (a text
    encoder whose every weight moved by at most ``MIN_DIFF`` did not)."""
    kept = []
    for name in dict.fromkeys(p.component for p in pairs):
        mine = [p for p in pairs if p.component == name]
        most = max(p.max_abs for p in mine)
        if most == 0 or (name != DIFFUSION_MODEL and most <= MIN_DIFF):
            report.left_out[name] = ("unchanged" if most == 0 else
                                     f"unchanged (no weight moved by more than {MIN_DIFF})")
            report.not_held.pop(name, None)
            report.convs_left_out.pop(name, None)
            continue
        changed = [p for p in mine if p.max_abs > 0]
        report.unchanged_modules += len(mine) - len(changed)
        kept += changed
    return kept


def _conv_rank(options: Options) -> int:
    return options.rank if options.conv_rank is None else options.conv_rank


def _cap(pair: _Pair, options: Options) -> int:
    """The rank asked for this module (``--conv-rank`` for a k x k convolution), at most the
    smaller side of its matrix (where the LoRA is the difference exactly)."""
    k_by_k = len(pair.shape) == 4 and pair.shape[2:] != (1, 1)
    rows, cols = pair.shape[0], math.prod(pair.shape[1:])
    return min(_conv_rank(options) if k_by_k else options.rank, rows, cols)


def _seed(pair: _Pair) -> int:
    return zlib.crc32(f"{pair.component}/{pair.key}".encode())


def _decompose(pair: _Pair, options: Options, device) -> tuple[Any, Any]:
    """Decomposes the module's difference: sets its rank (by the dynamic rule, if any) and
    the share kept; returns up and down in the layer's shapes, on the CPU, in fp32."""
    import torch

    cap = _cap(pair, options)
    delta = _difference(pair, device)
    svd = lowrank.top_svd(delta, cap, seed=_seed(pair))
    if options.dynamic:
        total_sum = None
        if options.dynamic == "quantile" and svd.s.numel() < min(delta.shape):
            total_sum = float(torch.linalg.svdvals(delta).sum())  # needs every value
        rank = lowrank.extract_rank(svd.s, options.dynamic, options.value, cap,
                                    total_sq=pair.norm_sq, total_sum=total_sum)
    else:
        rank = cap
    del delta
    pair.rank = rank
    pair.kept_sq = float(svd.s[:rank].double().pow(2).sum())
    up, down = svd.factors(rank)
    factors = lowrank.to_lora_shapes(up.cpu(), down.cpu(), pair.shape)
    if options.dynamic:
        dtype = torch_dtype(CLI_NAMES[options.dtype])
        pair.factors = (factors[0].to(dtype), factors[1].to(dtype))
    return factors


def _named(fam: Family, component: str, key: str, rows: int, fmt: str
           ) -> tuple[Named, ...] | None:
    """The output modules of a weight in ``fmt`` (several where the format splits a fused
    weight, each with its rows), or None where the format has no name for it."""
    try:
        return module_names(fam.id, component, key, fmt, rows=rows)
    except (KeyError, ValueError):
        return None


def _planned(pair: _Pair, options: Options, device) -> list[Planned]:
    """down, up and alpha of each output module of the pair: one decomposition, its up
    split by rows where the format names the weight's rows as several modules (each keeps
    the same down: the truncation restricted to its rows, exactly)."""
    import torch

    dtype: DType = CLI_NAMES[options.dtype]
    wanted = torch_dtype(dtype)
    rank, out_rows = pair.rank, pair.shape[0]
    rest = pair.shape[1:]
    conv = len(pair.shape) == 4
    held: dict[str, Any] = {}
    named = pair.named
    left = [2 * len(named)]  # tensors still to hand out from the decomposition

    def take(which: str, piece: Named):
        if not held:
            if pair.factors is None:
                held["up"], held["down"] = _decompose(pair, options, device)
            else:
                held["up"], held["down"] = pair.factors
        tensor = held[which]
        left[0] -= 1
        if left[0] == 0:
            held.clear()
        if which == "up" and (piece.rows or piece.swap):
            start, stop = piece.rows or (0, out_rows)
            tensor = tensor[start:stop]
            if piece.swap:
                half = tensor.shape[0] // 2
                tensor = torch.cat([tensor[half:], tensor[:half]])
        return tensor.to(wanted).contiguous()

    down_leaf, up_leaf = _LEAVES[options.fmt]
    planned = []
    for piece in named:
        start, stop = piece.rows or (0, out_rows)
        up_shape = (stop - start, rank, 1, 1) if conv else (stop - start, rank)
        planned += [Planned(piece.name + down_leaf, dtype, (rank, *rest),
                            partial(take, "down", piece)),
                    Planned(piece.name + up_leaf, dtype, up_shape, partial(take, "up", piece))]
        if options.fmt != "diffusers":  # PEFT's default alpha is the rank: the same scale 1
            planned.append(Planned(piece.name + ".alpha", dtype, (),
                                   partial(torch.tensor, float(rank), dtype=wanted)))
    return planned


def _retained(pairs: list[_Pair]) -> dict[str, float]:
    """Component -> the share of its difference (Frobenius) the LoRA keeps."""
    shares = {}
    for name in dict.fromkeys(p.component for p in pairs):
        mine = [p for p in pairs if p.component == name]
        total = sum(p.norm_sq for p in mine)
        shares[name] = min(1.0, math.sqrt(sum(p.kept_sq for p in mine) / total)) if total \
            else 1.0
    return shares


def _retained_later(pairs: list[_Pair], report: ExtractReport) -> Deferred:
    """The shares kept, for the metadata: known once every module is decomposed, which
    with a fixed rank is while the file is written; the report gets them then too."""
    def render(shares: dict[str, float]) -> str:  # fixed width: the placeholder's length
        return "{" + ", ".join(f"{json.dumps(k)}: {v:.6f}" for k, v in shares.items()) + "}"

    def resolve() -> str:
        report.retained = _retained(pairs)
        report.ranks = {"min": min(p.rank for p in pairs), "max": max(p.rank for p in pairs)}
        return render(report.retained)

    return Deferred(render(dict.fromkeys(dict.fromkeys(p.component for p in pairs), 0.0)),
                    resolve)


def _kohya_metadata(fam: Family, pairs: list[_Pair], options: Options) -> dict[str, str]:
    """kohya's ``ss_*`` keys (as its extract scripts write them) where kohya has the family."""
    if fam.id not in _SS_VERSION:
        return {}
    convs = any(len(p.shape) == 4 and p.shape[2:] != (1, 1) for p in pairs)
    args = {"conv_dim": str(_conv_rank(options)), "conv_alpha": str(float(_conv_rank(options)))} \
        if convs and not options.dynamic else {}
    dim = "Dynamic" if options.dynamic else str(options.rank)
    return {"ss_v2": str(fam.id == "sd2"), "ss_base_model_version": _SS_VERSION[fam.id],
            "ss_network_module": _SS_MODULE.get(fam.id, "networks.lora"),
            "ss_network_dim": dim,
            "ss_network_alpha": "Dynamic" if options.dynamic else str(float(options.rank)),
            "ss_network_args": json.dumps(args)}
