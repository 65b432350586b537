"""Low-rank math for LoRA extract, resize and merge: small pure functions over fp32 tensors.

- ``product_svd``: the exact SVD of a sum of products ``Σ up_i @ down_i``. Such a matrix has
  rank at most ``R = Σ r_i``, so it needs no SVD of the m x n matrix (what kohya's
  ``resize_lora.py`` and ``svd_merge_lora.py`` do, O(mn·min(m, n))): with QR(up) = Q1 R1 and
  QR(downᵀ) = Q2 R2, up @ down = Q1 (R1 R2ᵀ) Q2ᵀ, and the SVD of the small R x R middle gives
  U = Q1 Ũ and V = Q2 Ṽ. Cost O((m + n) R²), exact to rounding, every singular value kept, so
  the dynamic rank rules keep their meaning (a randomized SVD of up @ down, sd-scripts#2240,
  normalizes over only the values it computed).
- ``top_svd``: the leading singular triplets of a full difference W_tuned - W_base, by a
  randomized range finder (Halko, Martinsson and Tropp 2011, algorithm 4.4: a Gaussian sketch
  with ``OVERSAMPLE`` extra columns, ``POWER_ITERATIONS`` power iterations re-orthonormalized
  by QR each time), then an exact SVD of the small projected matrix. It costs a few matrix
  products with the m x n matrix instead of a full SVD, and the error of its truncation is
  within a fraction of a percent of the optimal one (Eckart-Young). Small matrices, where a
  sketch would not be much smaller than the matrix, get a full SVD.
- The rank rules: kohya's ``resize_lora.py`` (``sv_ratio``, ``sv_fro``, ``sv_cumulative``, each
  capped by the rank asked for) and LyCORIS's extraction modes (``ratio``, ``threshold``,
  ``quantile``) plus ``fro`` (kohya's sv_fro) for extract.
- Convolutions are flattened as kohya does: a k x k kernel (out, in, k, k) is the matrix
  out x (in·k·k); the LoRA's down is (r, in, k, k) and its up (out, r, 1, 1) (LoCon).

Factors are returned kohya's way: up = U·diag(S), down = Vᵀ, so up @ down is the truncation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Chosen by measurement (bench/lora_extract_bench.py --tune): rank 64 of 1280 x 1280 and
# 5120 x 1280 changes.
# The hardest case is a low-rank change under dense noise (a flat tail, no gap at the rank):
# there 16 columns and 2 iterations are 0.6-1.0% above the optimal error, 32 and 4 0.2-0.3%;
# on power-law spectra (what fine-tunes show) 32 and 4 are within 0.02%. Each iteration is two
# products with the matrix: 0.04 s against 2.5 s for the full SVD of a 1280 x 1280 matrix.
OVERSAMPLE = 32
POWER_ITERATIONS = 4
MIN_SV = 1e-6  # kohya's resize_lora.py: a largest singular value at or below it is a zero matrix

KOHYA_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
EXTRACT_RULES = ("ratio", "threshold", "quantile", "fro")


@dataclass
class SVD:
    """Singular triplets, largest first: ``u`` (m x k), ``s`` (k), ``vh`` (k x n)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up (m x rank) and down (rank x n), up @ down the truncation to ``rank``; a rank
        above what there is is padded with zero columns, so shapes stay as planned."""
        import torch

        k = min(rank, self.s.shape[0])
        up = self.u[:, :k] * self.s[:k]
        down = self.vh[:k]
        if k < rank:
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
            down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], 0)
        return up.contiguous(), down.contiguous()


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight or a change of one as the matrix a LoRA factors: linear as is, a convolution
    (out, in, kh, kw) as out x (in·kh·kw) (kohya: 1 x 1 squeezed, k x k flattened)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight


def to_lora_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """up and down shaped for the layer: (out, r) and (r, in) for a linear layer,
    (out, r, 1, 1) and (r, in, kh, kw) for a convolution."""
    if len(weight_shape) <= 2:
        return up, down
    rank = down.shape[0]
    return (up.reshape(weight_shape[0], rank, 1, 1),
            down.reshape(rank, *weight_shape[1:]))


def product_svd(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor]) -> SVD:
    """The exact SVD of ``Σ ups[i] @ downs[i]`` (each up m x r_i, each down r_i x n; fold
    weights and scales into the ups) from QR factors of the concatenated factors and an SVD
    of the R x R middle: O((m + n) R²). Singular values beyond R are exactly zero and left out."""
    import torch

    up = torch.cat([as_matrix(u) for u in ups], 1)
    down = torch.cat([as_matrix(d) for d in downs], 0)
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return SVD(q1 @ u, s, vh @ q2.T)


def top_svd(delta: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE,
            iterations: int = POWER_ITERATIONS, seed: int = 0) -> SVD:
    """The leading ``rank + oversample`` singular triplets of ``delta`` (m x n, fp32, on any
    device): a randomized range finder with power iterations, or a full SVD where the
    sketch would be as large as the smaller side. ``seed`` makes the sketch, hence the
    result, the same on every run."""
    import torch

    m, n = delta.shape
    width = rank + oversample
    if 2 * width >= min(m, n):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return SVD(u, s, vh)
    gen = torch.Generator(device=delta.device).manual_seed(seed)
    sketch = torch.randn(n, width, generator=gen, device=delta.device, dtype=delta.dtype)
    q = torch.linalg.qr(delta @ sketch).Q
    for _ in range(iterations):
        q = torch.linalg.qr(delta.T @ q).Q
        q = torch.linalg.qr(delta @ q).Q
    u, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
    return SVD(q @ u, s, vh)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's operations on one thread while inside: the QR factors and small SVDs of
    resize and merge are latency-bound, and splitting each over threads costs more in
    synchronization than it gains (measured on 2 busy cores: an SDXL LoRA's 42 modules
    resized in 4.1 s on one thread, 13.8 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kohya_rank(s: torch.Tensor, rule: str, value: float, cap: int) -> int:
    """The rank kohya's ``resize_lora.py`` keeps for singular values ``s`` (largest first):
    ``sv_ratio``: those above s_max / value; ``sv_cumulative``: the fewest whose sum reaches
    ``value`` of the total; ``sv_fro``: the fewest whose sum of squares reaches ``value``² of
    the total (the Frobenius norm kept); at most ``cap``, and 1 for a zero matrix."""
    import torch

    if rule not in KOHYA_RULES:
        raise ValueError(f"unknown rank rule {rule!r}")
    if s.numel() == 0 or float(s[0]) <= MIN_SV:
        return 1
    if rule == "sv_ratio":
        rank = int(torch.sum(s > s[0] / value))
    elif rule == "sv_cumulative":
        rank = _fewest_reaching(s, float(s.sum()), value)
    else:
        rank = _fewest_reaching(s.pow(2), float(s.pow(2).sum()), value ** 2)
    return max(1, min(rank, s.numel(), cap))


def _fewest_reaching(parts: torch.Tensor, total: float, share: float) -> int:
    """How many of ``parts`` (leading first) it takes for their sum to reach ``share`` of
    ``total``, as kohya finds it (``searchsorted`` of the cumulative shares); all of them
    where they do not."""
    import torch

    shares = torch.cumsum(parts, 0) / total
    return int(torch.searchsorted(shares, torch.tensor([share], dtype=shares.dtype))) + 1


def extract_rank(s: torch.Tensor, rule: str, value: float, cap: int, *,
                 total_sq: float | None = None, total_sum: float | None = None) -> int:
    """The rank LyCORIS's extraction keeps for singular values ``s`` (largest first, maybe
    only the leading ones): ``threshold``: those above ``value``; ``ratio``: those above
    ``value``·s_max; ``quantile``: those before the cumulative sum reaches ``value`` of the
    total; or ``fro``: kohya's sv_fro. ``total_sq`` (the squared Frobenius norm) and
    ``total_sum`` (the sum of every singular value) are the totals over the whole spectrum
    where ``s`` holds only its head. At least 1, at most ``cap``."""
    import torch

    if rule not in EXTRACT_RULES:
        raise ValueError(f"unknown rank rule {rule!r}")
    if rule == "threshold":
        rank = int(torch.sum(s > value))
    elif rule == "ratio":
        rank = int(torch.sum(s > value * s[0])) if s.numel() else 0
    elif rule == "quantile":
        total = float(s.sum()) if total_sum is None else total_sum
        rank = int(torch.sum(torch.cumsum(s, 0) < value * total))
    else:
        total = float(s.pow(2).sum()) if total_sq is None else total_sq
        rank = _fewest_reaching(s.pow(2), total, value ** 2) if total > 0 else 1
    return max(1, min(rank, s.numel(), cap))


def retained(s: torch.Tensor, rank: int, total_sq: float | None = None) -> float:
    """The share of the Frobenius norm a truncation to ``rank`` keeps: sqrt(Σ_{i<rank} s_i²
    / ‖M‖²), with ‖M‖² = ``total_sq`` where ``s`` holds only the leading values (1 for zero)."""
    total = float(s.pow(2).sum()) if total_sq is None else total_sq
    if total <= 0:
        return 1.0
    return min(1.0, math.sqrt(float(s[:rank].pow(2).sum()) / total))
