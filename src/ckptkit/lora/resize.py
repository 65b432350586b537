"""``lora resize``: a LoRA at another rank, by kohya's rules, exactly and streamed.

A LoRA or LoCon module's change up @ down has rank r at most, so its SVD comes from QR
factors of up and down and an r x r SVD (``lowrank.product_svd``): exact, every singular
value there is, milliseconds per module, where kohya's ``resize_lora.py`` takes the SVD of
the full out x in matrix. The new rank is ``--rank`` (at most the module's own: a higher one
would only add zeros) or a dynamic rule of kohya's (``sv_ratio``, ``sv_fro``,
``sv_cumulative``, capped by ``--rank`` when given). The effect at strength 1 is kept: where
the file has alpha tensors, new alpha = old scale x new rank (kohya's rule); where it has
none (PEFT), the scale is folded into the factors and diffusers' ``lora_adapter_metadata``,
which would give a rank the factors no longer have, is left out. Keys, their names and
dtypes are the input's; other adapter types (LoHa, LoKr, DoRA, full diffs, ...) are copied
unchanged, counted in the report. With a dynamic rule the ranks are computed in a first
pass (cheap) so that the output is written streaming like any other.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..engine.atomic import check_output_path
from ..engine.moves import copy_range
from ..engine.writer import Planned, Progress, write_safetensors
from ..errors import UsageError
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import torch_dtype
from ..ops.provenance import inherited, provenance, source_hashes
from . import factored, lowrank
from .modules import Module, read_modules


@dataclass
class ResizeReport:
    resized: int = 0
    ranks: dict[str, int] = field(default_factory=dict)  # "min"/"max" of the new ranks
    old_ranks: dict[str, int] = field(default_factory=dict)
    retained: float = 1.0  # share of the modules' change (Frobenius) kept, over all of them
    kept: dict[str, int] = field(default_factory=dict)  # adapter type -> modules copied as is


@dataclass(frozen=True)
class Options:
    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    value: float | None = None

    def check(self) -> None:
        if self.rank is None and self.dynamic is None:
            raise UsageError("lora resize needs --rank R or --dynamic RULE --value V")
        for name, given in (("--rank", self.rank), ("--conv-rank", self.conv_rank)):
            if given is not None and given < 1:
                raise UsageError(f"{name} must be at least 1, not {given}")
        if self.dynamic is None:
            if self.value is not None:
                raise UsageError("--value goes with --dynamic")
            return
        if self.dynamic not in lowrank.KOHYA_RULES:
            raise UsageError(f"--dynamic must be one of {', '.join(lowrank.KOHYA_RULES)}, "
                             f"not {self.dynamic!r}")
        if self.value is None or not math.isfinite(self.value):
            raise UsageError(f"--dynamic {self.dynamic} needs --value V")
        if self.dynamic == "sv_ratio" and self.value < 1:
            raise UsageError("--dynamic sv_ratio: --value is the largest singular value over "
                             "the smallest kept, 1 or more")
        if self.dynamic != "sv_ratio" and not 0 < self.value <= 1:
            raise UsageError(f"--dynamic {self.dynamic}: --value must be in (0, 1]")


@dataclass
class _Resized:
    module: Module
    scale: float
    rank: int = 0
    total_sq: float = 0.0
    kept_sq: float = 0.0


def resize(src: str, out: str, options: Options, *, progress: Progress | None = None,
           fsync: bool = True, hash_sources: bool = False) -> ResizeReport:
    """Writes ``src`` resized to ``out``; returns what changed."""
    options.check()
    check_output_path(out, (src,))
    with open_checkpoint(src) as lora:
        _, modules, _ = read_modules(lora)
        report = ResizeReport()
        jobs = {}
        for module in modules:
            if module.adapter in factored.LOW_RANK:
                jobs[module.name] = _Resized(module, factored.scale(module, lora))
            else:
                report.kept[module.adapter] = report.kept.get(module.adapter, 0) + 1
        if not jobs:
            raise UsageError(f"{src} has no LoRA or LoCon modules to resize (it has "
                             f"{', '.join(factored.describe(a) for a in report.kept)})")
        with lowrank.one_thread():
            for job in jobs.values():
                job.rank = _new_rank(job, lora, options)
        planned = _plan(lora, jobs)
        folded = any("alpha" not in j.module.keys for j in jobs.values())
        metadata = {**inherited(lora.metadata, ("lora_adapter_metadata",) if folded else ()),
                    **_kohya_metadata(lora.metadata, jobs, options),
                    **provenance("lora resize", [src], source_hashes([src], hash_sources),
                                 rank=str(options.rank or ""), conv_rank=str(
                                     options.conv_rank or ""), dynamic=options.dynamic or "",
                                 value=str(options.value or ""))}
        with lowrank.one_thread():
            write_safetensors(out, planned, metadata, inputs=(src,), progress=progress,
                              fsync=fsync)
    ranks = [j.rank for j in jobs.values()]
    old = [factored.rank_of(j.module) for j in jobs.values()]
    total = sum(j.total_sq for j in jobs.values())
    report.resized = len(jobs)
    report.ranks = {"min": min(ranks), "max": max(ranks)}
    report.old_ranks = {"min": min(old), "max": max(old)}
    report.retained = math.sqrt(sum(j.kept_sq for j in jobs.values()) / total) if total else 1.0
    return report


def _cap(job: _Resized, options: Options) -> int:
    """The most the module may keep: ``--rank`` (``--conv-rank`` for a k x k convolution),
    its own rank, and the smaller side of its matrix."""
    shape = factored.layer_shape(job.module)
    k_by_k = len(shape) == 4 and shape[2:] != (1, 1)
    asked = options.conv_rank if k_by_k and options.conv_rank else options.rank
    own = factored.rank_of(job.module)
    return min(asked or own, own, shape[0], math.prod(shape[1:]))


def _svd(job: _Resized, lora: Checkpoint) -> lowrank.SVD:
    up, down = factored.factors(job.module, lora)
    return lowrank.product_svd([up], [down])


def _new_rank(job: _Resized, lora: Checkpoint, options: Options) -> int:
    cap = _cap(job, options)
    if not options.dynamic:
        return cap
    return lowrank.kohya_rank(_svd(job, lora).s, options.dynamic, options.value, cap)


def _plan(lora: Checkpoint, jobs: dict[str, _Resized]) -> list[Planned]:
    """The input's keys in its order: each resized module's down, up (and alpha) where its
    first key was (a LoCon's Tucker core goes: the new down holds the kernel), the other
    tensors copied."""
    owner = {key: job for job in jobs.values() for key in job.module.keys.values()}
    planned: list[Planned] = []
    done: set[str] = set()
    for key, tensor in lora.items():
        job = owner.get(key)
        if job is None:
            planned.append(_copy(key, tensor))
        elif job.module.name not in done:
            done.add(job.module.name)
            planned += _module_plan(lora, job)
    return planned


def _copy(key: str, tensor: LazyTensor) -> Planned:
    produce = partial(copy_range, tensor) if tensor.is_contiguous else tensor.read
    return Planned(key, tensor.dtype, tensor.shape, produce)


def _module_plan(lora: Checkpoint, job: _Resized) -> list[Planned]:
    keys = job.module.keys
    shape = factored.layer_shape(job.module)
    conv = len(shape) == 4
    r = job.rank
    held: dict[str, Any] = {}
    up_t, down_t = lora[keys["up"]], lora[keys["down"]]

    def down():
        svd = _svd(job, lora)
        job.total_sq = float(svd.s.double().pow(2).sum()) * job.scale ** 2
        job.kept_sq = float(svd.s[:r].double().pow(2).sum()) * job.scale ** 2
        up, down = svd.factors(r)
        if "alpha" not in keys:  # no alpha to carry the scale: the factors do
            up = up * job.scale
        up, down = lowrank.to_lora_shapes(up, down, shape)
        held["up"] = up.to(torch_dtype(up_t.dtype))
        return down.to(torch_dtype(down_t.dtype))

    planned = [Planned(keys["down"], down_t.dtype, (r, *shape[1:]), down),
               Planned(keys["up"], up_t.dtype, (shape[0], r, 1, 1) if conv else (shape[0], r),
                       lambda: held.pop("up"))]
    if "alpha" in keys:
        alpha_t = lora[keys["alpha"]]

        def alpha():
            import torch

            return torch.tensor(job.scale * r, dtype=torch_dtype(alpha_t.dtype)).reshape(
                alpha_t.shape)

        planned.append(Planned(keys["alpha"], alpha_t.dtype, alpha_t.shape, alpha))
    return planned


def _kohya_metadata(metadata: dict[str, str], jobs: dict[str, _Resized], options: Options
                    ) -> dict[str, str]:
    """kohya's resize metadata, where the input has kohya's: the new dim and alpha (or
    "Dynamic") and a line in the training comment."""
    if "ss_network_dim" not in metadata:
        return {}
    old = max(factored.rank_of(j.module) for j in jobs.values())
    comment = metadata.get("ss_training_comment", "")
    if options.dynamic:
        return {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic",
                "ss_training_comment": f"Dynamic resize with {options.dynamic}: "
                                       f"{options.value} from {old}; {comment}"}
    alphas = Counter(j.scale * j.rank for j in jobs.values())
    return {"ss_network_dim": str(options.rank), "ss_network_alpha": str(
        alphas.most_common(1)[0][0]),
            "ss_training_comment": f"dimension is resized from {old} to {options.rank}; "
                                   f"{comment}"}
