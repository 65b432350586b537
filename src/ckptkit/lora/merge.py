"""``lora merge``: several LoRAs as one, the sum of their weighted changes, exactly.

ΔW = Σ w_i · scale_i · up_i @ down_i for each layer. kohya's default merge adds the ups and
the downs separately, which is not this sum; its ``svd_merge_lora.py`` takes the SVD of the
full sum. Here the sum stays a product of concatenated factors (rank Σ r_i): ``--concat``
writes it as it is (exact), ``--rank R`` truncates it by the exact method of resize
(``lowrank.product_svd``: QR of the factors and an SVD of Σr x Σr, no m x n matrix). A
module whose rank would exceed half the layer's smaller side is written as one full
``.diff`` (LyCORIS's rule for extraction; ComfyUI and AUTOMATIC1111 read it), smaller than
its factors there.

Modules are matched across files by the layer they change, not by name: names in any key
format the LoRAs use are turned into the family's canonical weight names
(``targets.pieces``), so a kohya LoRA and a diffusers/PEFT one of the same family merge.
The output is in the first LoRA's key format: a layer that LoRA has keeps its module's
names; one only later LoRAs have is named as the first LoRA's format names that layer
(``names.module_name``), or keeps its own name where that format has none for it. The factors
carry the scales (alpha = rank, scale 1). Only LoRA and LoCon modules can be summed as products: a
file with other adapter types (LoHa, LoKr, DoRA, ...) is refused, naming them.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..engine.atomic import check_output_path
from ..engine.writer import Planned, Progress, write_safetensors
from ..errors import UsageError, counted
from ..formats import Checkpoint, open_checkpoint
from ..formats.dtypes import DType, torch_dtype
from ..ops.provenance import provenance, source_hashes
from . import factored, lowrank
from .modules import Module, read_lora
from .names import module_name
from .specs import split_numbers
from .targets import Miss, names, pieces

_KOHYA_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "modelspec.architecture")


@dataclass
class MergeReport:
    modules: int = 0
    shared: int = 0  # modules more than one LoRA changes
    diffs: int = 0  # modules written as a full .diff
    ranks: dict[str, int] = field(default_factory=dict)
    retained: float = 1.0  # share of the summed change (Frobenius) kept, over all modules


@dataclass
class _Layer:
    """One layer's modules across the LoRAs: (input index, module, weight x scale); what it
    is (``_identity``); its tensors' names in the output: down, up, alpha (None: none)."""

    parts: list[tuple[int, Module, float]]
    shape: tuple[int, ...]
    identity: tuple
    keys: tuple[str, str, str | None] = ("", "", None)
    rank: int = 0
    diff: bool = False
    total_sq: float = 0.0
    kept_sq: float = 0.0


def parse_input(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` (see ``specs.split_numbers``)."""
    path, numbers = split_numbers(text, 1, "WEIGHT")
    return path, numbers[0] if numbers else 1.0


def merge(inputs: list[tuple[str, float]], out: str, *, rank: int | None = None,
          concat: bool = False, progress: Progress | None = None, fsync: bool = True,
          hash_sources: bool = False) -> MergeReport:
    """Writes the weighted sum of the LoRAs ``inputs`` ((path, weight) pairs) to ``out``."""
    if concat == (rank is not None):
        raise UsageError("lora merge needs --rank R or --concat, one of them")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, not {rank}")
    if len(inputs) < 2:
        raise UsageError("lora merge needs two LoRAs or more")
    paths = [p for p, _ in inputs]
    check_output_path(out, tuple(paths))
    with ExitStack() as stack:
        loras = [stack.enter_context(open_checkpoint(p)) for p in paths]
        layers = _layers(inputs, loras)
        report = MergeReport(modules=len(layers),
                             shared=sum(1 for la in layers.values() if len(la.parts) > 1))
        for layer in layers.values():
            total = sum(factored.rank_of(m) for _, m, _ in layer.parts)
            smaller = min(layer.shape[0], math.prod(layer.shape[1:]))
            layer.rank = total if concat else min(rank, total, smaller)
            layer.diff = layer.rank > smaller / 2
        report.diffs = sum(1 for la in layers.values() if la.diff)
        planned = [p for la in layers.values() for p in _plan(la, loras, concat)]
        first = loras[0].metadata
        metadata = {**{k: first[k] for k in _KOHYA_KEYS if k in first},
                    **provenance("lora merge", paths, source_hashes(paths, hash_sources),
                                 weights=[w for _, w in inputs],
                                 rank="concat" if concat else str(rank))}
        with lowrank.one_thread():
            write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                              fsync=fsync)
    ranks = [la.rank for la in layers.values() if not la.diff]
    report.ranks = {"min": min(ranks), "max": max(ranks)} if ranks else {}
    total = sum(la.total_sq for la in layers.values())
    report.retained = math.sqrt(sum(la.kept_sq for la in layers.values()) / total) \
        if total else 1.0
    return report


def _family(lora_family: str | None) -> str | None:
    """A family id whose layer names fit the LoRA's (FLUX.1's dev and schnell share them)."""
    return {"flux1": "flux1-dev", "sd3": "sd3.5-large"}.get(lora_family or "", lora_family)


def _identity(module: Module, family: str | None) -> tuple:
    """What a module changes, the same whatever its key format: its component and the
    canonical weights (and rows) its change lands in; its own name where that is unknown."""
    if family:
        for tiny in (False, True):
            try:
                return module.component, tuple(pieces(module, names(family, module.component,
                                                                     tiny)))
            except (Miss, KeyError):
                continue
    return module.component, module.path.replace(".", "_")


def _layers(inputs: list[tuple[str, float]], loras: list[Checkpoint]) -> dict[tuple, _Layer]:
    files = [read_lora(lora) for lora in loras]
    found = {f.analysis.info.family for f in files} - {None}
    if len(found) > 1:
        listed = ", ".join(f"{os.path.basename(p)} ({f.analysis.info.family or 'unknown'})"
                           for (p, _), f in zip(inputs, files, strict=True))
        raise UsageError(f"these LoRAs are for different families: {listed}")
    family = _family(found.pop() if found else None)
    layers: dict[tuple, _Layer] = {}
    for i, ((path, weight), lora, file) in enumerate(zip(inputs, loras, files, strict=True)):
        other = [m for m in file.modules if m.adapter not in factored.LOW_RANK]
        if other:
            kinds = sorted({factored.describe(m.adapter) for m in other})
            raise UsageError(f"{path} has {counted(len(other), 'module')} of other adapter "
                             f"types ({'; '.join(kinds)}): lora merge sums LoRA and LoCon "
                             "modules only")
        for module in file.modules:
            shape = factored.layer_shape(module)
            identity = _identity(module, family)
            layer = layers.setdefault(identity, _Layer([], shape, identity))
            if layer.shape != shape:
                raise UsageError(f"{module.name} of {path} changes a {list(shape)} weight, "
                                 f"where another LoRA's module for that layer changes "
                                 f"{list(layer.shape)}: they are not for one model")
            if any(j == i for j, _, _ in layer.parts):
                raise UsageError(f"{path} has two modules for the layer of {module.name}")
            layer.parts.append((i, module, weight * factored.scale(module, lora)))
    for layer in layers.values():
        layer.keys = _output_keys(layer, files[0].format, family)
    return layers


# The down and up leaves of each output format; kohya's and ComfyUI's carry an alpha.
_LEAVES = {"kohya": (".lora_down.weight", ".lora_up.weight"),
           "comfyui": (".lora_down.weight", ".lora_up.weight"),
           "diffusers": (".lora_A.weight", ".lora_B.weight")}


def _output_keys(layer: _Layer, first_format: str, family: str | None
                 ) -> tuple[str, str, str | None]:
    """The layer's down, up and alpha keys in the output (see the module doc)."""
    index, module, _ = layer.parts[0]
    pieces_ = layer.identity[1]
    if index != 0 and family and first_format in _LEAVES and isinstance(pieces_, tuple) \
            and len(pieces_) == 1 and pieces_[0][1:] == (None, None):
        try:
            name = module_name(family, module.component, pieces_[0][0], first_format)
        except (KeyError, ValueError):
            name = None
        if name:
            down, up = _LEAVES[first_format]
            alpha = name + ".alpha" if first_format != "diffusers" else None
            return name + down, name + up, alpha
    return module.keys["down"], module.keys["up"], module.keys.get("alpha")


def _product(layer: _Layer, loras: list[Checkpoint]) -> tuple[list[Any], list[Any]]:
    ups, downs = [], []
    for i, module, factor in layer.parts:
        up, down = factored.factors(module, loras[i])
        ups.append(up * factor)
        downs.append(down)
    return ups, downs


def _plan(layer: _Layer, loras: list[Checkpoint], concat: bool) -> list[Planned]:
    """The layer's tensors (``layer.keys``): down, up and alpha (= rank, where the format
    has one), or one ``.diff``."""
    import torch

    first_index, first, _ = layer.parts[0]
    dtype: DType = loras[first_index][first.keys["up"]].dtype
    shape, r = layer.shape, layer.rank
    down_key, up_key, alpha_key = layer.keys
    held: dict[str, Any] = {}

    def factors():
        ups, downs = _product(layer, loras)
        if concat:
            up, down = torch.cat(ups, 1), torch.cat(downs, 0)
            layer.total_sq = layer.kept_sq = float((up @ down).double().pow(2).sum())
            return up, down
        svd = lowrank.product_svd(ups, downs)
        layer.total_sq = float(svd.s.double().pow(2).sum())
        layer.kept_sq = float(svd.s[:r].double().pow(2).sum())
        return svd.factors(r)

    def diff():
        up, down = factors()
        return (up @ down).reshape(shape).to(torch_dtype(dtype))

    if layer.diff:
        return [Planned(down_key.rsplit(".", 2)[0] + ".diff", dtype, shape, diff)]

    def down():
        up, down = lowrank.to_lora_shapes(*factors(), shape)
        held["up"] = up.to(torch_dtype(dtype))
        return down.to(torch_dtype(dtype))

    conv = len(shape) == 4
    planned = [Planned(down_key, dtype, (r, *shape[1:]), down),
               Planned(up_key, dtype, (shape[0], r, 1, 1) if conv else (shape[0], r),
                       lambda: held.pop("up"))]
    if alpha_key:  # else the loaders' default, alpha = rank, is the same scale
        planned.append(Planned(alpha_key, dtype, (),
                               lambda: torch.tensor(float(r), dtype=torch_dtype(dtype))))
    return planned
