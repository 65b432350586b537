"""Which weight of a model each LoRA module changes, from the two headers alone.

A LoRA names a layer in its own naming (kohya's flattened names, diffusers' or ComfyUI's
dotted ones, XLabs' processors) and a model stores it in its own layout (a monolithic
LDM/SGM/BFL checkpoint, a ComfyUI standalone file, diffusers' files, kohya's checkpoints).
Both are translated through the family's canonical names (``arch.families``: what a ComfyUI
standalone file holds), using the conversions ckptkit already has for whole models rather
than tables of LoRA names: the diffusers names of a canonical weight are the targets of
``arch.diffusers_layout.to_diffusers``; how a model file stores a canonical weight is what
``arch.layouts.to_canonical`` (LDM) or ``diffusers_layout.from_diffusers`` (diffusers, kohya's
SD 1.x files) say. Those moves copy a weight, take row blocks of it (a fused qkv split into
q, k, v; FLUX's ``linear1`` into q, k, v and the MLP input; open_clip's ``in_proj``), stack
them, or swap the halves of an adaLN modulation; each is a correspondence between rows, and
a module's change lands where the rows of its own naming's weight land in the model's.

So a diffusers ``to_q`` module on a FLUX file with the fused ``linear1`` lands in rows
``(0, 3072)`` of that weight (``Target.rows``), and a kohya fused ``qkv`` module on a
diffusers FLUX file lands in three weights, each taking a third of the module's change
(``Target.delta_rows``). Modules that land nowhere are grouped with the reason: the LoRA is
another family's, the model lacks the component, the adapter type is not supported, no layer
of the model has its name, the model stores the weight in a way a row change cannot reach,
or the shapes differ. No tensor data is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache

from ..arch import diffusers_layout
from ..arch.detect import Identification
from ..arch.families import Family, families
from ..arch.layouts import Move, standalone_current_names, to_canonical
from ..errors import UsageError, a_or_an, counted
from ..formats import Checkpoint
from ..ops.inspect import identify_checkpoint
from .keys import FLAT_NAMINGS, Shape, fmt_shape
from .modules import Module, delta_size

# Adapter types a module may have for a bake to apply it. (IA)^3 scales a layer's
# activations; ComfyUI and diffusers do not apply it (ComfyUI#6381, #6397), nor does ckptkit.
SUPPORTED = frozenset({"lora", "dora", "loha", "lokr", "glora", "oft", "boft", "diff", "set"})

# Reasons a module lands nowhere, in the order a report lists them.
REASONS = {
    "other-family": "the LoRA is for another family",
    "missing-component": "the model lacks the component the modules adapt",
    "unsupported-adapter": "the adapter type is not supported",
    "unknown-module": "no layer of the model has the module's name",
    "other-layout": "the model stores the weight in a way a LoRA cannot reach",
    "shape": "the shapes do not fit",
}
_SD3 = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
_LEAVES = (".weight", ".scale")


@dataclass(frozen=True)
class Target:
    """A weight a module changes: ``key`` in the model file (in that file's own layout);
    ``rows``: the block of that weight's dim 0 the change lands in (None: all of it);
    ``delta_rows``: the block of the module's change (its rows) that lands there (None: all
    of it). Both blocks are ``(start, stop)`` and of one length."""

    key: str
    rows: tuple[int, int] | None = None
    delta_rows: tuple[int, int] | None = None


def bias_key(target: Target) -> str | None:
    """The key of the bias beside a target weight (where a ``diff_b`` lands, in the same
    rows), or None for a weight that has none by name (a norm's ``scale``)."""
    for weight, bias in ((".weight", ".bias"), ("in_proj_weight", "in_proj_bias")):
        if target.key.endswith(weight):
            return target.key[: -len(weight)] + bias
    return None


@dataclass
class Unmatched:
    """Modules that land nowhere, for one reason: ``reason`` (a key of ``REASONS``),
    ``detail`` (one sentence, for all of them), ``modules`` (their names), ``example`` (one
    module's particulars, when they differ by module)."""

    reason: str
    detail: str
    modules: list[str] = field(default_factory=list)
    example: str = ""


@dataclass
class Matching:
    """``targets``: module name -> the weights it changes (shape-checked); ``unmatched``: the
    others, grouped by reason; ``family``/``layout``: what the model was identified as."""

    targets: dict[str, tuple[Target, ...]]
    unmatched: list[Unmatched]
    family: str | None
    layout: str | None
    components: list[str]

    @property
    def unmatched_count(self) -> int:
        return sum(len(u.modules) for u in self.unmatched)


class Miss(Exception):
    """A module that lands nowhere: ``reason`` of ``REASONS`` and a sentence."""

    def __init__(self, reason: str, detail: str, example: str = ""):
        super().__init__(detail)
        self.reason, self.detail, self.example = reason, detail, example


# --- canonical names of a family's component and their other namings ---------------------


@dataclass(frozen=True)
class Names:
    """A component's layers by name: ``canonical`` module path -> canonical weight key, and
    ``diffusers`` module path -> the move making that diffusers weight from a canonical one;
    ``flat``: "_"-joined path -> (naming, dotted path) for both, for kohya's names;
    ``rows``: canonical weight key -> its rows (in the config the names were made from)."""

    canonical: dict[str, str]
    diffusers: dict[str, Move]
    flat: dict[str, tuple[str, str]]
    rows: dict[str, int]


def _module_path(key: str) -> str | None:
    for leaf in _LEAVES:
        if key.endswith(leaf):
            return key[: -len(leaf)]
    return None


@cache
def names(family_id: str, component: str, tiny: bool) -> Names:
    """The layer names of ``component`` of family ``family_id`` (full size or ``tiny``)."""
    fam = families()[family_id]
    table = fam.component(component).keys(tiny=tiny)
    canonical = {p: k for k in table if (p := _module_path(k))}
    diffusers: dict[str, Move] = {}
    try:
        moves = diffusers_layout.to_diffusers(fam, component, tiny, set(table))
    except (KeyError, ValueError):  # a family without a diffusers layout
        moves = []
    for move in moves:
        p = _module_path(move.target)
        if p and move.op in ("copy", "rows", "swap_halves"):
            diffusers[p] = move
    flat = {p.replace(".", "_"): ("diffusers", p) for p in diffusers}
    flat.update({p.replace(".", "_"): ("canonical", p) for p in canonical})
    rows = {k: shape[0] for k, shape in table.items() if shape}
    return Names(canonical, diffusers, flat, rows)


# A piece of a module's change in canonical names: (canonical weight key, its rows or None
# for all, the module's rows or None for all).
_Piece = tuple[str, tuple[int, int] | None, tuple[int, int] | None]


def _xlabs(path: str, delta: int | None) -> list[_Piece] | None:
    """x-flux's processor names: qkv_lora1/proj_lora1 the image stream, ...2 the text
    stream; a single block's qkv_lora is the q, k, v rows of ``linear1`` (diffusers'
    ``_convert_xlabs_flux_lora_to_diffusers``)."""
    block, _, rest = path.partition(".processor.")
    if not rest:
        return None
    if block.startswith("double_blocks."):
        stream = {"1": "img", "2": "txt"}.get(rest[-1])
        layer = {"qkv_lora": "attn.qkv", "proj_lora": "attn.proj"}.get(rest[:-1])
        return [(f"{block}.{stream}_{layer}.weight", None, None)] if stream and layer else None
    if block.startswith("single_blocks."):
        if rest == "qkv_lora" and delta:
            return [(f"{block}.linear1.weight", (0, delta), None)]
        if rest == "proj_lora":
            return [(f"{block}.linear2.weight", None, None)]
    return None


def _legacy(path: str) -> str:
    """Pre-PEFT diffusers attention processors name ``attn1.processor.to_q_lora``: the
    layer is ``attn1.to_q`` (``to_out`` is ``to_out.0``)."""
    path = path.replace(".processor.to_", ".to_")
    return path + ".0" if path.endswith(".to_out") else path


def pieces(module: Module, table: Names) -> list[_Piece]:
    """Where a module's change lands, in the canonical names of ``table``'s component;
    raises Miss when no layer has its name. A CLIP layer named without transformers'
    ``text_model.`` level (transformers 5's own names) is read as if it were there, as
    ckptkit reads such text encoders."""
    delta = _rows_or_none(module)
    if module.naming in FLAT_NAMINGS:
        found = table.flat.get(module.path) or table.flat.get("text_model_" + module.path)
        if found is None:
            raise Miss("unknown-module", "no layer of the model has these names")
        tries = [found]
    elif module.naming == "xlabs" or (".processor." in module.path and "_lora" in module.path):
        got = _xlabs(module.path, delta)
        if got is None:
            raise Miss("unknown-module", "no layer of the model has these names")
        return got
    else:
        dotted = _legacy(module.path)
        order = ("diffusers", "canonical") if module.naming in ("diffusers", "peft") \
            else ("canonical", "diffusers")
        tries = [(n, p) for n in order for p in (dotted, "text_model." + dotted)]
    leaf = ".scale" if module.adapter == "set" and module.keys["set"].endswith(".scale") \
        else ".weight"
    for naming, p in tries:
        if naming == "canonical" and p in table.canonical:
            key = table.canonical[p]
            if key.endswith(leaf):
                return [(key, None, None)]
        if naming == "diffusers" and p in table.diffusers:
            return _from_diffusers(table.diffusers[p], table)
    raise Miss("unknown-module", "no layer of the model has these names")


def _rows_or_none(module: Module) -> int | None:
    try:
        return delta_size(module)[0]
    except (ValueError, KeyError, IndexError):
        return None


def _from_diffusers(move: Move, table: Names) -> list[_Piece]:
    """The canonical rows a diffusers weight holds (``to_diffusers``' move making it)."""
    source = move.sources[0]
    if move.op == "copy":
        return [(source, None, None)]
    total = table.rows[source]
    if move.op == "rows":
        return [(source, move.row_range(total), None)]
    half = total // 2  # swap_halves: the diffusers weight is the canonical one's halves swapped
    return [(source, (0, half), (half, total)), (source, (half, total), (0, half))]


# --- how the model stores each canonical weight -----------------------------------------

# (model key, its first row, the canonical weight's first row, rows)
_Segment = tuple[str, int, int, int]


@dataclass
class _Part:
    """One component of the model: its family, the names of its layers, where each
    canonical weight is in the file, and the keys it stores in a way no row maps reach."""

    family: Family
    name: str
    tiny: bool
    layout: str
    segments: dict[str, list[_Segment]]
    unreachable: set[str]

    @property
    def names(self) -> Names:
        return names(self.family.id, self.name, self.tiny)


def _segments(moves: Iterable[Move], shapes: Mapping[str, Shape]) -> tuple[dict, set[str]]:
    """Canonical key -> segments, from moves that make canonical weights from the file's
    (``to_canonical``, ``from_diffusers``); and the canonical keys only a transpose or a
    reshape makes."""
    out: dict[str, list[_Segment]] = {}
    unreachable: set[str] = set()
    for move in moves:
        if move.op == "copy":
            src = move.sources[0]
            out[move.target] = [(src, 0, 0, _rows(shapes[src]))]
        elif move.op == "rows":
            src = move.sources[0]
            start, stop = move.row_range(_rows(shapes[src]))
            out[move.target] = [(src, start, 0, stop - start)]
        elif move.op == "concat":
            segs, at = [], 0
            for src in move.sources:
                n = _rows(shapes[src])
                segs.append((src, 0, at, n))
                at += n
            out[move.target] = segs
        elif move.op == "swap_halves":
            src = move.sources[0]
            half = _rows(shapes[src]) // 2
            out[move.target] = [(src, 0, half, half), (src, half, 0, half)]
        else:
            unreachable.add(move.target)
    return out, unreachable


def _rows(shape: Shape) -> int:
    return shape[0] if shape else 1


def _model_parts(ident: Identification, keys: list[str], shapes: Mapping[str, Shape],
                 lora_family: str | None) -> dict[str, _Part]:
    fam = _model_family(ident, lora_family)
    parts = {}
    for report in ident.components:
        if report.name not in fam.component_names:
            continue
        comp = fam.component(report.name)
        tiny = report.size == "tiny"
        mine = [k for k in keys if k.startswith(report.prefix)]
        layout = report.layout
        if layout == "ldm":
            moves, _ = to_canonical(comp, set(mine))
        elif layout == "diffusers" or (
                layout == "kohya" and diffusers_layout.kohya_renames(fam)):
            moves = _from_diffusers_file(fam, report.name, tiny, report.prefix, mine)
        else:  # comfyui, kohya's SDXL: the canonical names under a prefix
            bare = {k[len(report.prefix):]: k for k in mine}
            current = standalone_current_names(comp, list(bare))
            moves = [Move(current[b], (k,)) for b, k in bare.items()]
        segments, unreachable = _segments(moves, shapes)
        parts[report.name] = _Part(fam, report.name, tiny, layout, segments, unreachable)
    return parts


def _from_diffusers_file(fam: Family, name: str, tiny: bool, prefix: str,
                         keys: list[str]) -> list[Move]:
    table = fam.component(name).keys(tiny=tiny)
    known = {m.target for m in diffusers_layout.to_diffusers(fam, name, tiny, set(table))}
    present = {k[len(prefix):] for k in keys} & known
    moves = diffusers_layout.from_diffusers(fam, name, tiny, present)
    return [Move(m.target, tuple(prefix + s for s in m.sources), m.op) for m in moves]


def _model_family(ident: Identification, lora_family: str | None) -> Family:
    """The family whose names the model is read in: its own, or for a part alone that fits
    several (a CLIP-L), the LoRA's where it is one of them."""
    if ident.family:
        return families()[ident.family]
    fits = ident.compatible_families
    for fid in fits:
        if lora_family and compatible(lora_family, fid):
            return families()[fid]
    return families()[fits[0]]


def compatible(lora_family: str, model_family: str) -> bool:
    """Whether a LoRA detected as ``lora_family`` (``lora.detect``'s ids: "flux1" for both
    FLUX.1 models, "sd3" when the variant is open) was made for ``model_family``."""
    if lora_family == "flux1":
        return model_family.startswith("flux1")
    if lora_family == "sd3":
        return model_family in _SD3
    return lora_family == model_family


# --- matching ------------------------------------------------------------------------------


def match(modules: list[Module], model: Checkpoint, lora_family: str | None = None,
          model_ident: Identification | None = None) -> Matching:
    """Where each module lands in ``model`` (an open checkpoint of any layout ckptkit
    reads), from headers only. ``lora_family`` is what the LoRA was trained for (``lora.
    detect``'s family; None: unknown), which a model of another family refuses; pass
    ``model_ident`` when the model was already identified."""
    ident = model_ident or identify_checkpoint(model)
    if ident.kind not in ("checkpoint", "diffusion-model", "text-encoder"):
        raise UsageError(f"{model.path} is {a_or_an(ident.describe())}, not a model a LoRA applies "
                         "to (a checkpoint, a diffusion model or a text encoder)")
    if not ident.family and not ident.compatible_families:
        raise UsageError(f"{model.path}: ckptkit cannot tell which model this is, so not "
                         "where a LoRA lands in it")
    shapes = {k: t.shape for k, t in model.tensors.items()}
    parts = _model_parts(ident, list(shapes), shapes, lora_family)
    fams = [ident.family] if ident.family else list(ident.compatible_families)
    other = lora_family is not None and not any(compatible(lora_family, f) for f in fams)
    targets: dict[str, tuple[Target, ...]] = {}
    groups: dict[tuple[str, str], Unmatched] = {}
    for module in modules:
        try:
            if other:
                raise Miss("other-family", f"the LoRA is for {lora_family}; the model is "
                            f"{' / '.join(fams)}")
            targets[module.name] = _targets(module, parts, shapes)
        except Miss as miss:
            group = groups.setdefault((miss.reason, miss.detail),
                                      Unmatched(miss.reason, miss.detail, example=miss.example))
            group.modules.append(module.name)
    order = list(REASONS)
    unmatched = sorted(groups.values(), key=lambda u: (order.index(u.reason), u.detail))
    layouts = {p.layout for p in parts.values()}
    return Matching(targets, unmatched, ident.family or None,
                    layouts.pop() if len(layouts) == 1 else ident.layout, list(parts))


def _targets(module: Module, parts: dict[str, _Part], shapes: Mapping[str, Shape]
             ) -> tuple[Target, ...]:
    if module.adapter not in SUPPORTED:
        raise Miss("unsupported-adapter", f"{module.adapter} modules are not supported "
                    "(ComfyUI and diffusers do not apply them either)")
    part = parts.get(module.component)
    if part is None:
        what = "no component ckptkit knows" if module.component == "other" else \
            f"no {module.component}"
        raise Miss("missing-component", f"the model has {what}"
                    if module.component != "other" else
                    "these modules adapt no component ckptkit knows")
    try:
        rows, cols = delta_size(module)
    except (ValueError, KeyError, IndexError) as exc:
        raise Miss("shape", "the module's own tensors do not fit together",
                    f"{module.name}: {exc}") from None
    found = pieces(module, part.names)
    out: list[Target] = []
    covered = 0
    for canonical, canon_rows, d_rows in found:
        if canonical in part.unreachable:
            raise Miss("other-layout", f"the model stores {canonical} transposed or "
                        "reshaped, which ckptkit does not apply a LoRA to")
        segments = part.segments.get(canonical)
        if segments is None:
            raise Miss("other-layout", f"the model file has no weight for {canonical} "
                        f"(its {part.name} is in the {part.layout} layout)")
        total = sum(s[3] for s in segments)
        a, b = canon_rows or (0, total)
        d0 = d_rows[0] if d_rows else 0
        for key, m_start, c_start, n in segments:
            lo, hi = max(a, c_start), min(b, c_start + n)
            if lo >= hi:
                continue
            out.append(Target(key, (m_start + lo - c_start, m_start + hi - c_start),
                              (d0 + lo - a, d0 + hi - a)))
            covered += hi - lo
    if rows is not None and covered != rows:
        raise Miss("shape", "the module changes another number of rows than the model's "
                    "weight has", f"{module.name} changes {rows} rows; {_where(out)} has "
                    f"{covered}")
    if rows is None:
        rows = covered
    final = []
    for t in out:
        shape = shapes[t.key]
        if cols is not None and _cols(shape) != cols:
            raise Miss("shape", "the module's input width differs from the model's weight",
                        f"{module.name} changes a {rows} x {cols} weight; {t.key} is "
                        f"{fmt_shape(shape)}")
        whole = (0, _rows(shape))
        final.append(Target(t.key, None if t.rows == whole else t.rows,
                            None if t.delta_rows == (0, rows) else t.delta_rows))
    _check_bias(module, final, shapes)
    return tuple(final)


def _where(targets: list[Target]) -> str:
    return ", ".join(sorted({t.key for t in targets})) or "the model"


def _cols(shape: Shape) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _check_bias(module: Module, targets: list[Target], shapes: Mapping[str, Shape]) -> None:
    if "diff_b" not in module.keys:
        return
    for t in targets:
        key = bias_key(t)
        if key is None or key not in shapes:
            raise Miss("shape", "the module changes a bias the model's layer does not have",
                        f"{module.name}: no {key or 'bias beside ' + t.key}")


def summary(matching: Matching) -> str:
    """One line: how many modules land where."""
    n = len(matching.targets)
    return f"{counted(n, 'module')} match, {counted(matching.unmatched_count, 'module')} do not"
