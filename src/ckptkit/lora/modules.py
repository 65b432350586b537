"""A LoRA file as a list of adapted modules: what every other LoRA operation starts from.

``read_modules(lora)`` turns an open LoRA checkpoint (any key format ``keys`` parses: kohya
``lora_unet_``/``lora_te*_``, LyCORIS, diffusers/PEFT and its older spellings, ComfyUI
``diffusion_model.``/``text_encoders.``, AI-toolkit, XLabs, BFL control) into ``Module``s:
one per adapted layer, with its adapter type, the key of each of its tensors by role, and
the component it adapts. Headers only: no tensor data is read.

Adapter types (``Module.adapter``) and the roles of their tensors (``Module.keys``):

- ``lora``: ``down`` (r x in[, k, k]), ``up`` (out x r[, 1, 1]), optional ``mid`` (LoCon's
  Tucker core, r x r x k x k) and ``alpha`` (0-d). kohya, LyCORIS LoCon, PEFT ``lora_A``/
  ``lora_B``, the older diffusers spellings, XLabs and BFL control LoRAs alike.
- ``dora``: a ``lora`` with ``dora_scale`` (LyCORIS/kohya ``dora_scale``, PEFT's
  ``lora_magnitude_vector``, whose shape differs: see the adapter math). Other adapters
  may carry a ``dora_scale`` role too (LyCORIS' ``wd`` option for LoHa/LoKr).
- ``loha``: ``w1a w1b w2a w2b`` (+ ``t1 t2`` Tucker cores), ``alpha``.
- ``lokr``: ``w1`` or ``w1a w1b``, ``w2`` or ``w2a w2b`` (+ ``t2``), ``alpha``.
- ``glora``: ``a1 a2 b1 b2``, ``alpha``.
- ``oft`` (LyCORIS diag-OFT, and kohya's OFT: ``Module.convention`` "kohya-oft" tells them
  apart, their constraints differ) and ``boft``: ``blocks`` (+ ``rescale``), ``alpha``.
- ``ia3``: ``weight`` and ``on_input``.
- ``diff``: a full difference ``diff`` (LyCORIS full, ComfyUI's ``full_diff``; ``w_norm`` of
  a norm layer), or a bias difference alone.
- ``set``: ``set`` replaces the weight (BFL control LoRAs' ``*_norm.scale``, ComfyUI's
  ``.set_weight``).

``diff_b`` (a bias difference: ``.diff_b``, ``.b_norm``, and a BFL control LoRA's
``lora_B.bias``) may come beside any of them.

A module's delta shape, for matching it against a model, is ``delta_size``; its rank ``rank``;
its alpha ``alpha`` (None: scale 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import FormatError
from .detect import ADAPTERS, KEY_FORMATS, Analysis, adapter_type, analyse
from .keys import DIFFUSION_MODEL, Parsed, Shape, fmt_shape, naming
from .keys import path as name_path
from .metadata import peft_alpha

__all__ = ["ADAPTERS", "KEY_FORMATS", "LoraFile", "Module", "alpha", "alpha_values", "delta_size",
           "modules_of", "rank", "read_lora", "read_modules"]

@dataclass(frozen=True)
class Module:
    """One adapted layer of a LoRA file.

    ``name``: the module's key prefix in the file (its keys are ``name`` + a suffix);
    ``adapter``: one of ``ADAPTERS``; ``keys``: role -> key in the file (see the module doc);
    ``component``: "diffusion_model", "clip_l", "clip_g", "openclip_h", "t5xxl" (or "other"
    for a module in no component ckptkit knows). ``naming``: how ``path`` names the layer
    ("kohya"/"lycoris" flatten the path with "_"; "comfyui", "diffusers", "peft", "bare",
    "xlabs" keep its dots); ``path``: the name after its prefix; ``convention``: the tensor
    convention of the module (``keys``' format names: "kohya-lora", "peft", "kohya-oft"...);
    ``shapes``: role -> the shape of that tensor (from the header).
    """

    name: str
    adapter: str
    keys: Mapping[str, str]
    component: str
    naming: str = ""
    path: str = ""
    convention: str = ""
    shapes: Mapping[str, Shape] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraFile:
    """What ``read_modules`` found, with the detection report (``analysis.info``)."""

    format: str
    modules: list[Module]
    leftover: list[str]
    analysis: Analysis = field(repr=False)


def read_modules(lora) -> tuple[str, list[Module], list[str]]:
    """``(key format, modules, leftover keys)`` of an open LoRA checkpoint (``ckptkit.open``'s
    ``Checkpoint``): the key format is one of ``KEY_FORMATS``; leftover keys are in no
    complete module (bundled embeddings, stray tensors). Raises FormatError when the file
    is no LoRA."""
    found = read_lora(lora)
    return found.format, found.modules, found.leftover


def read_lora(lora) -> LoraFile:
    """``read_modules``, with the detection report."""
    shapes = {k: t.shape for k, t in lora.tensors.items()}
    return modules_of(shapes, lora.metadata, alpha_values(lora), path=lora.path)


def modules_of(shapes: Mapping[str, Shape], metadata: Mapping[str, str] | None = None,
               values: Mapping[str, float] | None = None, path: str | None = None) -> LoraFile:
    """``read_lora`` from a header: key -> shape, the metadata, the decoded alphas."""
    if not shapes:  # no key can belong to a module: say so, not that too many do not
        raise FormatError("holds no tensors, so no LoRA or other adapter", path)
    found = analyse(shapes, metadata or {}, values)
    if found is None:
        raise FormatError("is not a LoRA or other adapter ckptkit knows (too many of its keys "
                          "belong to no adapter module)", path)
    modules = [_module(p, shapes) for p in found.adapters]
    modules += [Module(k[: -len(".scale")], "set", {"set": k}, DIFFUSION_MODEL, "bare",
                       k[: -len(".scale")], "bfl-control-lora", {"set": tuple(shapes[k])})
                for k in found.scales]
    return LoraFile(found.info.key_format, modules, list(found.leftover), found)


def _module(p: Parsed, shapes: Mapping[str, Shape]) -> Module:
    return Module(p.name, adapter_type(p), dict(p.roles), p.component, naming(p), name_path(p),
                  p.fmt or "", {role: tuple(shapes[key]) for role, key in p.roles.items()})


# --- the shape of a module's change ------------------------------------------------------


def delta_size(module: Module) -> tuple[int | None, int | None]:
    """``(rows, cols)`` of the weight the module changes: its output features, and the
    product of its other dimensions (in x k x k); None where the tensors do not say (OFT's
    inputs, (IA)^3). Raises ValueError, one sentence, when the module's tensors do not fit
    together (a rank mismatch)."""
    k, m = module.keys, module

    def sh(role: str) -> Shape:
        return tuple(module.shapes[role])

    def rank_check(a: str, ax: int, b: str, bx: int) -> None:
        if sh(a)[ax] != sh(b)[bx]:
            raise ValueError(f"rank mismatch: {k[a]} is {fmt_shape(sh(a))} but {k[b]} is "
                             f"{fmt_shape(sh(b))}")

    if m.adapter in ("lora", "dora"):
        rank_check("up", 1, "down", 0)
        if "mid" in k:
            rank_check("mid", 0, "down", 0)
            rank_check("mid", 1, "up", 1)
            return sh("up")[0], sh("down")[1] * _prod(sh("mid")[2:])
        return sh("up")[0], sh("down")[1] * _prod(sh("down")[2:])
    if m.adapter == "loha":
        for a, b in (("w1a", "w1b"), ("w2a", "w2b")):
            t = "t" + a[1]
            if t in k:
                rank_check(a, 0, b, 0)
            else:
                rank_check(a, 1, b, 0)
        if "t1" in k:
            return sh("w1a")[1], sh("w1b")[1] * _prod(sh("t1")[2:])
        return sh("w1a")[0], sh("w1b")[1]
    if m.adapter == "lokr":
        if "w1" in k:
            a, c = sh("w1")[:2]
        else:
            rank_check("w1a", 1, "w1b", 0)
            a, c = sh("w1a")[0], sh("w1b")[1]
        if "w2" in k:
            b, d = sh("w2")[0], sh("w2")[1] * _prod(sh("w2")[2:])
        elif "t2" in k:
            rank_check("w2a", 0, "w2b", 0)
            b, d = sh("w2a")[1], sh("w2b")[1] * _prod(sh("t2")[2:])
        else:
            rank_check("w2a", 1, "w2b", 0)
            b, d = sh("w2a")[0], sh("w2b")[1]
        return a * b, c * d
    if m.adapter == "glora":
        a1, a2, b1, b2 = (sh(r) for r in ("a1", "a2", "b1", "b2"))
        # the older LyCORIS layout (b2 b1 + W a2 a1), by adapters._glora_old's rule with
        # that layout's own out (b2's rows) and in (b1's columns); on a square layer the
        # new layout's rank checks pass too, and would read b1's r rows as the output
        if b2[1] == b1[0] == a1[0] == a2[1] and (
                not b2[0] == b1[1] == a1[1] == a2[0] or a2[0] == b2[0] == b1[1]):
            return b2[0], b1[1] * _prod(b1[2:])
        rank_check("b1", 1, "b2", 0)
        rank_check("a1", 1, "a2", 0)
        return sh("b1")[0], sh("b2")[1] * _prod(sh("b2")[2:])
    if m.adapter in ("oft", "boft"):
        blocks = sh("blocks")
        return blocks[-3] * blocks[-1], None
    if m.adapter == "diff":
        if "diff" in k:
            return sh("diff")[0], _prod(sh("diff")[1:])
        return sh("diff_b")[0], None
    if m.adapter == "set":
        return (sh("set")[0] if sh("set") else 1), _prod(sh("set")[1:])
    return None, None  # ia3: whether it scales inputs or outputs is a value, not a shape


def alpha_values(lora) -> dict[str, float]:
    """The values of an open LoRA's 0-d ``.alpha`` tensors, by key (the only data that
    reading a LoRA's modules reads); one that cannot be decoded is left out."""
    values = {}
    for key, tensor in lora.tensors.items():
        if key.endswith(".alpha") and tensor.numel == 1:
            with contextlib.suppress(FormatError):  # an alpha we cannot decode stays unknown
                values[key] = tensor.scalar()
    return values


def alpha(module: Module, lora) -> float | None:
    """The module's alpha: its ``.alpha`` tensor's value (0 read as "none", as kohya and
    ComfyUI do), else for diffusers/PEFT names what diffusers' ``lora_adapter_metadata``
    gives it (``metadata.peft_alpha``), else None: scale 1 (alpha = rank), as kohya, ComfyUI
    and diffusers read a module without one. ``lora`` is the open LoRA checkpoint; only the
    0-d alpha tensor is read."""
    key = module.keys.get("alpha")
    if key is not None:
        value = lora.tensors[key].scalar()
        return value if value != 0 else None
    r = rank(module)
    if module.naming in ("diffusers", "peft") and r:
        component, _, path = module.name.partition(".")
        return peft_alpha(lora.metadata, component, path, r)
    return None


def _prod(dims) -> int:
    return math.prod(dims) if dims else 1


def rank(module: Module) -> int | None:
    """The rank of a module's low-rank factors (None for adapters without one)."""
    role = {"lora": "down", "dora": "down", "glora": "a2"}.get(module.adapter)
    if role:
        return module.shapes[role][0]
    for role in ("w1b", "w2b"):
        if role in module.shapes and module.adapter in ("loha", "lokr"):
            return module.shapes[role][0]
    return None
