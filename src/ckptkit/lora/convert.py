"""``ckpt lora convert``: a LoRA's modules renamed into kohya, ComfyUI or diffusers naming.

Every module is placed on the canonical weight(s) it changes (``targets.pieces``, the same
translation ``check`` and ``bake`` use), then named as the target format names those weights
(``names.module_names``). Where both sides name a weight the same way, a module is renamed
and its tensors are copied file to file: a round trip without fusing gives the same bytes.
Where they differ (SD3's and FLUX's fused qkv and ``linear1``, which diffusers splits):

- splitting one fused module into q, k, v (and FLUX's MLP input): each part keeps the
  ``down`` tensor and takes its rows of ``up``; rank and alpha are unchanged, so the change is
  exactly the fused one's rows;
- fusing separate modules into one: the downs are stacked (the ranks add up) and the ups
  placed block-diagonally, each in its rows (rows no module changes stay zero); when every
  part has the same alpha/rank the alpha is that scale times the summed rank, else each up is
  scaled by its own alpha/rank and alpha is the summed rank. The parts of a module split
  earlier (the same ``down`` in each, the same alpha) are put back as they were: one down,
  the ups stacked, the original rank;
- a diffusers adaLN modulation holds the canonical weight's two halves exchanged: its up's
  rows are exchanged back.

The diffusers (PEFT) format has no alpha tensor: ``lora_A`` is multiplied by alpha/rank
(computed in fp32, stored in its dtype: exact when alpha/rank is a power of two, as it
usually is). A format that cannot hold a module's adapter type (LoHa, LoKr, GLoRA, OFT,
(IA)^3 or full diffs in diffusers' PEFT names; a LoKr to split) is refused, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..arch.families import families, family_id
from ..engine.atomic import check_output_path
from ..engine.moves import copy_range
from ..engine.writer import Planned, Progress, write_safetensors
from ..errors import UsageError, a_or_an, counted
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import BY_NAME, DType
from ..ops.provenance import inherited, provenance
from .detect import KEY_FORMATS
from .modules import Module, alpha, alpha_values, delta_size, modules_of, rank
from .names import FORMATS, Named, module_names
from .targets import Miss, Names, compatible, names, pieces

# Tensor suffixes of each role in kohya's (and ComfyUI's) files, by adapter type.
_KOHYA_SUFFIXES = {
    "up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight",
    "alpha": ".alpha", "dora_scale": ".dora_scale", "diff": ".diff", "diff_b": ".diff_b",
    "a1": ".a1.weight", "a2": ".a2.weight", "b1": ".b1.weight", "b2": ".b2.weight",
    "blocks": ".oft_blocks", "rescale": ".rescale", "weight": ".weight",
    "on_input": ".on_input", "set": ".set_weight"}
_LOHA = {"w1a": ".hada_w1_a", "w1b": ".hada_w1_b", "w2a": ".hada_w2_a", "w2b": ".hada_w2_b",
         "t1": ".hada_t1", "t2": ".hada_t2"}
_LOKR = {"w1": ".lokr_w1", "w2": ".lokr_w2", "w1a": ".lokr_w1_a", "w1b": ".lokr_w1_b",
         "w2a": ".lokr_w2_a", "w2b": ".lokr_w2_b", "t2": ".lokr_t2"}
# diffusers' PEFT names (save_lora_weights): lora_A/lora_B, a bias of lora_B (BFL control).
_PEFT_SUFFIXES = {"down": ".lora_A.weight", "up": ".lora_B.weight", "diff_b": ".lora_B.bias"}
_PEFT_CONVENTIONS = ("peft", "bfl-control-lora")
_ADAPTER_NAMES = {"loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT",
                  "ia3": "(IA)^3", "diff": "full-diff", "set": "weight-replacing", "dora": "DoRA",
                  "lora": "LoRA"}


@dataclass
class _Part:
    """A module's change landing in rows ``canon`` of a canonical weight, from its own rows
    ``delta``."""

    module: Module
    canon: tuple[int, int]
    delta: tuple[int, int]


@dataclass
class _Weight:
    """A canonical weight of one component and the parts of modules that land in it."""

    component: str
    key: str
    rows: int
    parts: list[_Part] = field(default_factory=list)


def convert_file(src: str, dst: str, fmt: str, family: str | None = None,
                 progress: Progress | None = None, fsync: bool = True) -> dict[str, Any]:
    """Writes LoRA ``src`` in key format ``fmt`` (one of ``names.FORMATS``) to ``dst``;
    ``family`` when the LoRA's weights do not tell. Returns a report (the ``--json``)."""
    if fmt not in FORMATS:
        raise UsageError(f"--to must be one of {', '.join(FORMATS)}, not {fmt!r}")
    check_output_path(dst, (src,))
    with open_checkpoint(src) as lora:
        found = modules_of({k: t.shape for k, t in lora.tensors.items()}, lora.metadata,
                           alpha_values(lora), path=src)
        fam = _family(found.modules, found.analysis.info.family, family, src, fmt)
        weights = _place(found.modules, fam, src)
        plan = _Plan(lora, fmt, fam)
        for weight in weights:
            plan.add(weight)
        for key in found.leftover:  # bundled embeddings and the like go along unchanged
            plan.copy(key, key)
        if found.leftover:
            plan.notes.append(f"{counted(len(found.leftover), 'key')} in no adapter module "
                              "copied unchanged")
        # diffusers' adapter config is not kept: the alphas it held are in the tensors now
        metadata = {**inherited(lora.metadata, ("lora_adapter_metadata",)),
                    **provenance("lora convert", [src], to=fmt, family=fam)}
        write_safetensors(dst, plan.planned, metadata, inputs=(src,), progress=progress,
                          fsync=fsync)
    return {"input": src, "output": dst, "family": fam, "from": found.format, "to": fmt,
            "from_name": KEY_FORMATS.get(found.format, found.format),
            "modules_in": len(found.modules), "modules_out": plan.modules,
            "tensors": len(plan.planned), "renamed": plan.renamed, "split": plan.split,
            "fused": plan.fused, "notes": plan.notes}


def _family(modules: list[Module], detected: str | None, given: str | None, src: str,
            fmt: str) -> str:
    """The family whose names the modules are read in: the one given, else of those the
    detected family stands for (all, when it is unknown) the first naming every module,
    else the one naming most. Families that name every module but would write ``fmt``
    names of their own (FLUX.1's and SD3's transformers both have attn.to_q/to_k/to_v, which
    kohya names double_blocks_N_img_attn_qkv in one, joint_blocks_N_x_block_attn_qkv in the
    other) are not chosen between: where the shapes did not decide, the user must."""
    if given:
        fid = family_id(given)
        if fid not in families():
            raise UsageError(f"unknown family {given!r}; known: {', '.join(families())}")
        return fid
    candidates = [f for f in families() if detected is None or compatible(detected, f)]
    counts = {fid: sum(1 for m in modules if _table(m, fid) is not None) for fid in candidates}
    whole = [fid for fid, count in counts.items() if count == len(modules)]
    if whole:
        namings: dict[frozenset[str], list[str]] = {}
        for fid in whole:
            namings.setdefault(_names_written(modules, fid, fmt, src), []).append(fid)
        if len(namings) > 1:
            fits = ", ".join(g[0] + (f" (or {', '.join(g[1:])})" if g[1:] else "")
                             for g in namings.values())
            raise UsageError(f"the modules fit families that name them differently in {fmt}: "
                             f"{fits}, and their shapes do not tell which; give --family", src)
        return whole[0]
    best = max(candidates, key=lambda fid: counts[fid], default=None)
    if best is None or counts[best] == 0:
        raise UsageError("no family ckptkit knows names these modules; give --family", src)
    return best


def _names_written(modules: list[Module], fam: str, fmt: str, src: str) -> frozenset[str]:
    """The module names ``fmt`` gives these modules read as ``fam``'s."""
    return frozenset(out.name for w in _place(modules, fam, src)
                     for out in module_names(fam, w.component, w.key, fmt, w.rows))


def _table(module: Module, fam: str, src: str | None = None) -> Names | None:
    """The names (full size, else tiny) of the module's component in which its change has
    the rows of the canonical weight(s) it lands on; None when no layer has its name (or,
    while the family is still being chosen, ``src`` None, when its rows fit no layer).
    A module of one part of a fused weight (FLUX's ``to_q`` of ``qkv``) is sized by that
    part's rows, not the whole weight's, so a tiny model's pieces are not placed in the
    full-size rows; a module that fits neither is refused here, before anything is read."""
    if module.component not in families()[fam].component_names:
        return None
    rows = _delta_rows(module)
    for tiny in (False, True):
        table = names(fam, module.component, tiny)
        try:
            found = pieces(module, table)
        except Miss:
            return None
        if rows is None or all(_fits(table, rows, *piece) for piece in found):
            return table
    if src is None:
        return None
    raise UsageError(f"{src}: module {module.name} changes {rows} rows, which fits no layer "
                     f"of {fam} it names; nothing was written")


def _fits(table: Names, rows: int, key: str, canon: tuple[int, int] | None,
          delta: tuple[int, int] | None) -> bool:
    """Whether a module of ``rows`` rows can land as this piece: its rows (or the part of
    them the piece takes) within the canonical weight's."""
    if delta is not None:
        return delta[1] <= rows
    size = canon[1] - canon[0] if canon else table.rows.get(key)
    return size == rows


def _delta_rows(module: Module) -> int | None:
    try:
        return delta_size(module)[0]
    except (ValueError, KeyError, IndexError):
        return None


def _place(modules: list[Module], fam: str, src: str) -> list[_Weight]:
    """The canonical weights the modules land on, in the order of the modules."""
    weights: dict[tuple[str, str], _Weight] = {}
    lost = []
    for module in modules:
        table = _table(module, fam, src)
        if table is None:
            lost.append(module.name)
            continue
        rows = _delta_rows(module)
        for key, canon, delta in pieces(module, table):
            total = table.rows[key]
            weight = weights.setdefault((module.component, key),
                                        _Weight(module.component, key, total))
            c = canon or (0, total)
            d = delta or (0, rows if rows is not None and canon is None else c[1] - c[0])
            weight.parts.append(_Part(module, c, d))
    if lost:
        raise UsageError(f"{src}: {counted(len(lost), 'module')} name no layer of {fam} "
                         f"(e.g. {lost[0]}): they cannot be renamed; nothing was written")
    return list(weights.values())


class _Plan:
    """The output tensors, planned weight by weight."""

    def __init__(self, lora: Checkpoint, fmt: str, fam: str):
        self.lora, self.fmt, self.fam = lora, fmt, fam
        self.planned: list[Planned] = []
        self.notes: list[str] = []
        self.modules = self.renamed = self.split = self.fused = 0

    def tensor(self, module: Module, role: str) -> LazyTensor:
        return self.lora.tensors[module.keys[role]]

    def copy(self, key: str, source_key: str) -> None:
        tensor = self.lora.tensors[source_key]
        produce = partial(copy_range, tensor) if tensor.is_contiguous else tensor.read
        self.planned.append(Planned(key, tensor.dtype, tensor.shape, produce))

    def add(self, weight: _Weight) -> None:
        outputs = module_names(self.fam, weight.component, weight.key, self.fmt, weight.rows)
        for out in outputs:
            span = out.rows or (0, weight.rows)
            parts = [p for p in weight.parts if p.canon[0] < span[1] and span[0] < p.canon[1]]
            if not parts:
                continue
            self.modules += 1
            only = parts[0]
            if (len(parts) == 1 and only.canon == span and not out.swap
                    and only.delta == (0, _delta_rows(only.module) or only.delta[1])):
                self._rename(only.module, out.name)
                self.renamed += 1
            elif all(p.module.adapter == "lora" and "mid" not in p.module.keys
                     for p in parts):
                self._lora(out, span, parts)
            else:
                bad = next(p for p in parts if p.module.adapter != "lora"
                           or "mid" in p.module.keys)
                split = bad.canon[0] < span[0] or span[1] < bad.canon[1]
                raise UsageError(
                    f"{bad.module.name}: {_a(bad.module.adapter)} module cannot be "
                    f"{'split' if split else 'fused'} into {self.fmt}'s {out.name}: only "
                    "plain LoRA modules can; nothing was written")

    # --- a module renamed -------------------------------------------------------------

    def _rename(self, module: Module, name: str) -> None:
        if self.fmt == "diffusers":
            self._rename_peft(module, name)
            return
        if module.adapter == "set" and module.keys["set"].endswith(".scale"):
            if self.fmt != "comfyui":
                raise UsageError(f"{module.name}: a weight-replacing {module.keys['set']} "
                                 f"has no {self.fmt} name; convert to comfyui")
            name += ".scale"  # ComfyUI names a weight that is not a .weight by its key
        if module.convention in _PEFT_CONVENTIONS and "dora_scale" in module.keys:
            raise UsageError(f"{module.name}: PEFT's DoRA magnitude is per output row, "
                             "kohya's dora_scale per input column; not convertible exactly")
        suffixes = {**_KOHYA_SUFFIXES, **(_LOHA if module.adapter == "loha" else
                                          _LOKR if module.adapter == "lokr" else {})}
        for role, key in module.keys.items():
            self.copy(name + suffixes[role], key)
        scale = _scale(self.lora, module)
        if "alpha" not in module.keys and scale != 1.0:  # PEFT's alpha from its metadata
            self._alpha(name + suffixes["alpha"], scale * (rank(module) or 1), module)

    def _rename_peft(self, module: Module, name: str) -> None:
        if module.adapter not in ("lora", "dora") or "mid" in module.keys:
            what = "LoCon Tucker (lora_mid)" if module.adapter == "lora" else \
                _ADAPTER_NAMES[module.adapter]
            raise UsageError(f"{module.name}: diffusers' PEFT format cannot hold "
                             f"{a_or_an(what)} module; convert to kohya or comfyui; nothing "
                             "was written")
        if module.adapter == "dora" and module.convention not in _PEFT_CONVENTIONS:
            raise UsageError(f"{module.name}: kohya's dora_scale is per input column, PEFT's "
                             "DoRA magnitude per output row; not convertible exactly")
        scale = _scale(self.lora, module)
        for role, key in module.keys.items():
            if role == "alpha":
                continue
            suffix = _PEFT_SUFFIXES.get(role)
            if suffix is None:  # a PEFT DoRA magnitude, under its own name
                suffix = key[len(module.name):]
            if role == "down" and scale != 1.0:
                tensor = self.lora.tensors[key]
                self.planned.append(Planned(name + suffix, tensor.dtype, tensor.shape,
                                            partial(_scaled, tensor, scale)))
            else:
                self.copy(name + suffix, key)

    # --- modules split or fused -------------------------------------------------------

    def _lora(self, out: Named, span: tuple[int, int], parts: list[_Part]) -> None:
        """One output module from rows of several (fused) or of one (split) LoRA module."""
        rows = span[1] - span[0]
        blocks = []  # (module, its up rows, the output's rows)
        for p in parts:
            lo, hi = max(span[0], p.canon[0]), min(span[1], p.canon[1])
            d0, o0 = p.delta[0] + lo - p.canon[0], lo - span[0]
            o = (o0, o0 + hi - lo)
            blocks.append((p.module, (d0, d0 + hi - lo), _swapped(o, rows) if out.swap else o))
        mods = list({b[0].name: b[0] for b in blocks}.values())
        scales = {m.name: _scale(self.lora, m) for m in mods}
        common = len(set(scales.values())) == 1
        shared = len(mods) == 1 or (common and _same_downs(self.lora, mods))
        if len(mods) == 1:
            self.split += 1
        else:
            self.fused += 1
        peft = self.fmt == "diffusers"
        downs = [self.tensor(m, "down") for m in mods]
        offsets = [0] * len(mods) if shared else \
            [sum(d.shape[0] for d in downs[:i]) for i in range(len(mods))]
        r = downs[0].shape[0] if shared else sum(d.shape[0] for d in downs)
        suffixes = _suffixes(self.fmt)
        # diffusers has no alpha: each down takes its scale. kohya keeps alpha; where the
        # parts' scales differ, each up takes its own and alpha is the rank (scale 1).
        down_scales = [scales[m.name] if peft else 1.0 for m in mods]
        up_scale = {m.name: scales[m.name] if not peft and not common else 1.0 for m in mods}
        where = {m.name: offsets[i] for i, m in enumerate(mods)}
        down = downs[0]
        if shared:
            produce = partial(_scaled, down, down_scales[0]) if down_scales[0] != 1.0 else \
                partial(copy_range, down) if down.is_contiguous else down.read
            self.planned.append(Planned(out.name + suffixes["down"], down.dtype, down.shape,
                                        produce))
        else:
            self.planned.append(Planned(out.name + suffixes["down"], down.dtype,
                                        (r, *down.shape[1:]),
                                        partial(_stacked, list(zip(downs, down_scales,
                                                                   strict=True)))))
        up = self.tensor(mods[0], "up")
        shape = (rows, r, *up.shape[2:])
        up_blocks = [(self.tensor(m, "up"), d, o, where[m.name], up_scale[m.name])
                     for m, d, o in blocks]
        self.planned.append(Planned(out.name + suffixes["up"], up.dtype, shape,
                                    partial(_placed, up_blocks, shape)))
        if peft:
            return
        if shared and "alpha" in mods[0].keys:
            self.copy(out.name + suffixes["alpha"], mods[0].keys["alpha"])
        elif not shared or scales[mods[0].name] != 1.0:
            self._alpha(out.name + suffixes["alpha"],
                        scales[mods[0].name] * r if common else float(r), mods[0])

    def _alpha(self, key: str, value: float, like: Module) -> None:
        """An alpha tensor, in the dtype of ``like``'s (fp32 where it has none)."""
        dtype = _alpha_dtype(self.lora, like)
        self.planned.append(Planned(key, dtype, (), partial(_scalar, value, dtype)))


def _a(adapter: str) -> str:
    return a_or_an(_ADAPTER_NAMES.get(adapter, adapter))


def _suffixes(fmt: str) -> Mapping[str, str]:
    return _PEFT_SUFFIXES if fmt == "diffusers" else _KOHYA_SUFFIXES


def _swapped(rows: tuple[int, int], total: int) -> tuple[int, int]:
    """Rows of a weight whose two halves are exchanged, where ``rows`` lie in one half."""
    half = total // 2
    shift = half if rows[0] < half else -half
    return rows[0] + shift, rows[1] + shift


def _scale(lora: Checkpoint, module: Module) -> float:
    """alpha / rank (1 where the module has no alpha: kohya's, ComfyUI's and diffusers'
    reading; and where it is not finite, which no format can carry)."""
    value, r = alpha(module, lora), rank(module)
    if value is None or not r or not math.isfinite(value):
        return 1.0
    return value / r


def _alpha_dtype(lora: Checkpoint, module: Module) -> DType:
    key = module.keys.get("alpha")
    return lora.tensors[key].dtype if key else BY_NAME["F32"]


def _same_downs(lora: Checkpoint, modules: list[Module]) -> bool:
    """Whether the modules share one ``down`` (the parts of a module split earlier)."""
    import torch

    first = lora.tensors[modules[0].keys["down"]]
    ref = first.read()
    for m in modules[1:]:
        other = lora.tensors[m.keys["down"]]
        if other.shape != first.shape or other.dtype != first.dtype or \
                not torch.equal(other.read(), ref):
            return False
    return True


def _scaled(tensor: LazyTensor, scale: float):
    data = tensor.read()
    return (data.float() * scale).to(data.dtype)


def _stacked(downs: list[tuple[LazyTensor, float]]):
    import torch

    return torch.cat([_scaled(t, s) if s != 1.0 else t.read() for t, s in downs])


def _placed(blocks: list[tuple[LazyTensor, tuple[int, int], tuple[int, int], int, float]],
            shape: tuple[int, ...]):
    """An up matrix with each source up's rows ``d`` in rows ``o`` and columns from ``col``
    (its rank's place), scaled by ``s``; zeros elsewhere."""
    import torch

    out = None
    for tensor, d, o, col, s in blocks:
        up = tensor.read_rows(d[0], d[1])
        if out is None:
            out = torch.zeros(shape, dtype=up.dtype)
        r = up.shape[1]
        out[o[0]:o[1], col:col + r] = (up.float() * s).to(up.dtype) if s != 1.0 else up
    return out


def _scalar(value: float, dtype: DType):
    import torch

    from ..formats.dtypes import torch_dtype
    return torch.tensor(value, dtype=torch_dtype(dtype))

