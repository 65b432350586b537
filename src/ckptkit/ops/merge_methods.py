"""Merge methods: each a small pure function of the tensors of one key (fp32 in, fp32 out).

The engine reads the inputs of one key, calls the method, casts and writes the result; a
method never sees files, dtypes or devices. ``METHODS`` describes each for ``--help`` and
for the recipe recorded in the output: its inputs, its parameters and its formula.
``PARAMS`` says which values each parameter may take, so that a recipe is refused before
anything is read rather than writing a model of NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Tensors = Sequence["torch.Tensor"]


def weighted_sum(t: Tensors, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    import torch

    a, b = t
    return torch.lerp(a, b, alpha, out=out)


def add_difference(t: Tensors, alpha: float) -> torch.Tensor:
    a, b, c = t
    return a + alpha * (b - c)


def triple_sum(t: Tensors, alpha: float, beta: float) -> torch.Tensor:
    a, b, c = t
    return (1 - alpha - beta) * a + alpha * b + beta * c


def sum_twice(t: Tensors, alpha: float, beta: float) -> torch.Tensor:
    import torch

    a, b, c = t
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


def n_average(t: Tensors) -> torch.Tensor:
    import torch

    return torch.stack(list(t)).mean(0)


def slerp(t: Tensors, alpha: float) -> torch.Tensor:
    """Spherical interpolation of the directions, linear interpolation of the norms; falls
    back to a weighted sum where the directions are (anti)parallel or a norm is zero."""
    import torch

    a, b = t
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, alpha)
    ua, ub = a / na, b / nb
    dot = (ua * ub).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        return torch.lerp(a, b, alpha)
    s = torch.sin(omega)
    direction = (torch.sin((1 - alpha) * omega) * ua + torch.sin(alpha * omega) * ub) / s
    return direction * torch.lerp(na, nb, alpha)


def train_difference(t: Tensors, alpha: float) -> torch.Tensor:
    """supermerger's "train difference": add difference with each element's share of B - C
    scaled by how far B moved from A, relative to how far B is from C (times 1.8, as
    supermerger does): A + 1.8 alpha (B - C) |B - A| / (|B - A| + |B - C|), 0 where both
    distances are 0."""
    import torch

    a, b, c = t
    diff = b - c
    moved = (b - a).abs()
    total = moved + diff.abs()
    share = torch.where(total != 0, moved / total, torch.zeros_like(total))
    return a + (1.8 * alpha) * diff * share


def add_perpendicular(t: Tensors, alpha: float) -> torch.Tensor:
    """A plus the part of (B - C) orthogonal to (A - C): what B learned that A did not.
    Where A equals C (A learned nothing in this tensor) all of B - C is new, so A + alpha
    (B - C); sd-mecha adds nothing there (its projection divides by zero and it falls back
    to zeros)."""
    a, b, c = t
    da, db = a - c, b - c
    norm2 = (da * da).sum()
    if norm2 == 0:
        return a + alpha * db
    return a + alpha * (db - da * (da * db).sum() / norm2)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the ``density`` fraction of entries with the largest magnitude."""
    import torch

    k = round(density * delta.numel())
    if k >= delta.numel():
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _disjoint_mean(deltas: torch.Tensor) -> torch.Tensor:
    """TIES: the sign with the larger total mass wins per entry; the deltas agreeing with it
    are averaged (zeros do not count)."""
    import torch

    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    total = (deltas * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


def ties(t: Tensors, alpha: float, density: float) -> torch.Tensor:
    """TIES merging of the models after the first against the first as base: trim each task
    vector to its top ``density``, elect signs, average the agreeing entries."""
    import torch

    base, *models = t
    deltas = torch.stack([_trim(m - base, density) for m in models])
    return base + alpha * _disjoint_mean(deltas)


def dare(t: Tensors, alpha: float, drop: float, seed: int, key_seed: int,
         ties_signs: bool = False) -> torch.Tensor:
    """DARE: each task vector keeps entries with probability 1 - ``drop`` and is rescaled by
    1 / (1 - drop); summed (linear) or TIES-combined. Seeded per key: reproducible."""
    import torch

    base, *models = t
    gen = torch.Generator().manual_seed(seed * 1_000_003 + key_seed)
    deltas = []
    for m in models:
        keep = (torch.rand(m.shape, generator=gen) >= drop).to(m.device)  # CPU-seeded
        deltas.append((m - base) * keep / (1 - drop))  # drop < 1: PARAMS
    stacked = torch.stack(deltas)
    merged = _disjoint_mean(stacked) if ties_signs else stacked.mean(0)
    return base + alpha * merged


def dare_ties(t: Tensors, alpha: float, drop: float, seed: int, key_seed: int):
    return dare(t, alpha, drop, seed, key_seed, ties_signs=True)


def model_stock(t: Tensors) -> torch.Tensor:
    """Model Stock: the average of the fine-tunes pulled toward the base by how much their
    task vectors agree (t = N cos / (1 + (N - 1) cos), cos their mean pairwise cosine)."""
    import torch

    base, *models = t
    n = len(models)
    deltas = [(m - base).flatten() for m in models]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            ni, nj = deltas[i].norm(), deltas[j].norm()
            if ni > 0 and nj > 0:
                cosines.append(float((deltas[i] @ deltas[j]) / (ni * nj)))
    if not cosines:
        return torch.stack(models).mean(0)
    cos = sum(cosines) / len(cosines)
    ratio = n * cos / (1 + (n - 1) * cos) if (1 + (n - 1) * cos) != 0 else 0.0
    return ratio * torch.stack(models).mean(0) + (1 - ratio) * base


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable[..., torch.Tensor]
    inputs: str  # "2", "3", "2+" or "3+"
    defaults: dict[str, float]  # the parameters it takes, with their defaults
    formula: str
    elementwise: bool = False  # each output element depends on the same element only
    # The same result from 16-bit inputs into their own dtype (``out=`` a buffer to fill),
    # computed by one torch kernel that widens to fp32 internally and rounds once
    # (bit-identical to the fp32 path; a test checks it): no fp32 copies of the inputs.
    narrow: Callable[..., torch.Tensor] | None = None

    def arity_ok(self, count: int) -> bool:
        need = int(self.inputs.rstrip("+"))
        return count >= need if self.inputs.endswith("+") else count == need


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("weighted-sum", weighted_sum, "2", {"alpha": 0.5}, "(1 - alpha) A + alpha B", True,
           narrow=weighted_sum),
    Method("add-difference", add_difference, "3", {"alpha": 1.0}, "A + alpha (B - C)", True),
    Method("triple-sum", triple_sum, "3", {"alpha": 1 / 3, "beta": 1 / 3},
           "(1 - alpha - beta) A + alpha B + beta C", True),
    Method("sum-twice", sum_twice, "3", {"alpha": 0.5, "beta": 0.5},
           "lerp(lerp(A, B, alpha), C, beta)", True),
    Method("n-average", n_average, "2+", {}, "mean of all models", True),
    Method("slerp", slerp, "2", {"alpha": 0.5},
           "spherical interpolation of directions, linear of norms"),
    Method("train-difference", train_difference, "3", {"alpha": 1.0},
           "A + 1.8 alpha (B - C) |B - A| / (|B - A| + |B - C|)  (supermerger)", True),
    Method("add-perpendicular", add_perpendicular, "3", {"alpha": 1.0},
           "A + alpha (the part of B - C orthogonal to A - C)"),
    Method("ties", ties, "2+", {"alpha": 1.0, "density": 0.2},
           "A + alpha TIES(trim to density, elect sign, disjoint mean) of the others - A"),
    Method("dare", dare, "2+", {"alpha": 1.0, "drop": 0.9, "seed": 0},
           "A + alpha mean(drop with probability p, rescale 1/(1-p)) of the others - A"),
    Method("dare-ties", dare_ties, "2+", {"alpha": 1.0, "drop": 0.9, "seed": 0},
           "DARE, then TIES sign election and disjoint mean"),
    Method("model-stock", model_stock, "3+", {},
           "A + t (mean of the others - A), t from their mean pairwise cosine"),
)}


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows any)
        return False


@dataclass(frozen=True)
class Param:
    """The values a parameter may take: ``accepts`` tests one, ``valid`` says which in words.
    Weights (alpha, beta) may be any finite number: outside [0, 1] they extrapolate, which
    people use on purpose (supermerger and sd-mecha allow it too); a fraction of entries kept
    or dropped only makes sense as a fraction, and a drop of 1 would divide by zero."""

    accepts: Callable[[float], bool]
    valid: str


SEED_MAX = 2**32 - 1  # torch's generator takes 64 bits; the seed is scaled per key (dare)
PARAMS: dict[str, Param] = {
    "alpha": Param(_finite, "a finite number"),
    "beta": Param(_finite, "a finite number"),
    "density": Param(lambda v: _finite(v) and 0 < v <= 1,
                     "a fraction of the entries kept, above 0 and at most 1"),
    "drop": Param(lambda v: _finite(v) and 0 <= v < 1,
                  "a fraction of the entries dropped, at least 0 and below 1"),
    "seed": Param(lambda v: isinstance(v, int) and 0 <= v <= SEED_MAX,
                  f"a whole number from 0 to {SEED_MAX}"),
}


def param_problem(name: str, value: float) -> str | None:
    """Why ``value`` is not a valid ``name``, or None; numbers only (per-block weights are
    checked value by value once parsed)."""
    param = PARAMS[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not param.accepts(value):
        return f"{name} must be {param.valid}, not {value!r}"
    return None
