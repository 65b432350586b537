"""The low-rank math of LoRA resize, merge and extract (``ckptkit.lora.lowrank``), checked
against ``torch.linalg.svd`` of the full matrix (the slow way), against LyCORIS's own
extraction (``lycoris.utils.extract_linear``), and against kohya's rank rules written out
here from ``networks/resize_lora.py``'s definitions."""

from __future__ import annotations

import math

import pytest
import torch

from ckptkit.lora.lowrank import (
    SVD,
    extract_rank,
    kohya_rank,
    product_svd,
    retained,
    to_lora_shapes,
    top_svd,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An m x n matrix whose singular values are ``s`` (random singular vectors)."""
    g = _gen(seed)
    k = s.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


def _slow(matrix: torch.Tensor) -> SVD:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return SVD(u, s, vh)


def _truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    up, down = _slow(matrix).factors(rank)
    return (up @ down).float()


def _close_spectrum(ours: torch.Tensor, ref: torch.Tensor, count: int) -> None:
    ours, ref = ours[:count].double(), ref[:count].double()
    assert torch.all((ours - ref).abs() <= 1e-4 * ref.abs().clamp_min(ref[0] * 1e-3)), \
        (ours - ref).abs().max()


@pytest.mark.parametrize("shape", [(96, 80), (40, 200), (64, 32, 3, 3)])
def test_product_svd_is_the_svd_of_the_product(shape):
    g = _gen(1)
    rank = 12
    out, rest = shape[0], shape[1:]
    up = torch.randn(out, rank, *([1, 1] if len(shape) == 4 else []), generator=g)
    down = torch.randn(rank, *rest, generator=g)
    full = up.reshape(out, rank) @ down.reshape(rank, -1)
    ref = _slow(full)
    ours = product_svd([up], [down])
    assert ours.s.shape == (rank,)
    _close_spectrum(ours.s, ref.s, rank)
    for k in (1, 5, rank):
        a, b = ours.factors(k)
        assert torch.allclose(a @ b, _truncation(full, k), atol=1e-4 * float(ref.s[0]))
    # the factors come out in the layer's shapes, and multiply back to the change
    up2, down2 = to_lora_shapes(*ours.factors(rank), shape)
    assert up2.shape[:2] == (out, rank) and down2.shape == (rank, *rest)
    assert torch.allclose(up2.reshape(out, rank) @ down2.reshape(rank, -1), full,
                          atol=1e-4 * float(ref.s[0]))


def test_product_svd_of_a_weighted_sum_is_the_svd_of_the_sum():
    g = _gen(2)
    m, n = 120, 90
    parts = [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), w)
             for r, w in ((8, 0.7), (16, -0.3), (4, 1.5))]
    total = sum(w * (u @ d) for u, d, w in parts)
    ours = product_svd([w * u for u, _, w in parts], [d for _, d, _ in parts])
    ref = _slow(total)
    _close_spectrum(ours.s, ref.s, 28)
    assert float(ref.s[28]) < 1e-6 * float(ref.s[0])  # the sum has rank 28 at most (fp32)
    for k in (6, 20):
        a, b = ours.factors(k)
        assert torch.allclose(a @ b, _truncation(total, k), atol=1e-4 * float(ref.s[0]))


def test_factors_pad_a_rank_above_what_there_is():
    g = _gen(3)
    svd = product_svd([torch.randn(10, 3, generator=g)], [torch.randn(3, 12, generator=g)])
    up, down = svd.factors(5)
    assert up.shape == (10, 5) and down.shape == (5, 12)
    assert torch.count_nonzero(up[:, 3:]) == 0 and torch.count_nonzero(down[3:]) == 0


@pytest.mark.parametrize("m,n", [(300, 260), (500, 60), (120, 700)])
def test_top_svd_gives_a_low_rank_change_back(m, n):
    g = _gen(4)
    change = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.01
    for rank in (8, 16):
        up, down = top_svd(change, rank, seed=1).factors(rank)
        assert torch.allclose(up @ down, change, atol=1e-6 * float(change.abs().max()) * 100)


def _noisy_change(m: int, n: int, seed: int, noise: float = 1.0) -> torch.Tensor:
    """A low-rank change with decaying strengths under dense noise: the flat tail that makes
    a sketch's job hardest (no gap in the spectrum at the rank)."""
    g = _gen(seed)
    signal = (torch.randn(m, 24, generator=g) * torch.logspace(0, -1.5, 24)) \
        @ torch.randn(24, n, generator=g)
    noise_part = torch.randn(m, n, generator=g)
    return signal / signal.norm() + noise_part / noise_part.norm() * noise


@pytest.mark.parametrize("m,n,rank", [(400, 320, 32), (320, 900, 16), (260, 140, 40)])
def test_top_svd_error_is_within_one_percent_of_eckart_young(m, n, rank):
    change = _noisy_change(m, n, seed=m)
    s = torch.linalg.svdvals(change.double())
    optimal = math.sqrt(float(s[rank:].pow(2).sum()))  # the discarded values' share
    exact = float((change - _truncation(change, rank)).norm())
    assert exact == pytest.approx(optimal, rel=1e-5)
    up, down = top_svd(change, rank, seed=5).factors(rank)
    ours = float((change - up @ down).norm())
    assert optimal <= ours * (1 + 1e-5) and ours <= 1.01 * optimal
    kept = retained(torch.linalg.svdvals(change.double()), rank)
    assert kept == pytest.approx(math.sqrt(1 - optimal ** 2 / float(change.double().norm()) ** 2),
                                 rel=1e-6)


def test_top_svd_is_the_same_on_every_run_and_follows_the_device():
    change = _noisy_change(300, 280, seed=9).to("cpu")
    a = top_svd(change, 20, seed=3)
    b = top_svd(change, 20, seed=3)
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s)
    assert a.u.device == change.device


# kohya sd-scripts networks/resize_lora.py, written out independently: S largest first,
# rank = index + 1, the index clamped to [0, len(S) - 1]; then 1 if S[0] <= 1e-6, and at most
# the rank asked for.
def _kohya_expected(s: list[float], rule: str, value: float, cap: int) -> int:
    if s[0] <= 1e-6:
        return 1
    if rule == "sv_ratio":
        index = sum(1 for x in s if x > s[0] / value) - 1
    else:
        parts = s if rule == "sv_cumulative" else [x * x for x in s]
        target = value if rule == "sv_cumulative" else value * value
        total = sum(parts)
        running, index = 0.0, len(s)
        for i, x in enumerate(parts):  # searchsorted (left): first share >= target
            running += x
            if running / total >= target:
                index = i
                break
    index = max(0, min(index, len(s) - 1))
    return min(index + 1, cap)


_SPECTRA = {
    "geometric": [0.8 ** i * 3.0 for i in range(40)],
    "power law": [(i + 1) ** -0.7 for i in range(64)],
    "step": [5.0] * 6 + [0.5] * 20 + [0.01] * 10,
}


@pytest.mark.parametrize("spectrum", list(_SPECTRA))
@pytest.mark.parametrize("rule,values", [("sv_ratio", (2.0, 10.0, 1000.0)),
                                         ("sv_fro", (0.5, 0.9, 0.99, 1.0)),
                                         ("sv_cumulative", (0.3, 0.8, 0.97))])
def test_kohya_rules_pick_kohyas_rank(spectrum, rule, values):
    s = _SPECTRA[spectrum]
    for value in values:
        for cap in (4, 32, 128):
            expected = _kohya_expected(s, rule, value, cap)
            got = kohya_rank(torch.tensor(s, dtype=torch.float64), rule, value, cap)
            assert got == expected, (spectrum, rule, value, cap)
    assert kohya_rank(torch.zeros(8), rule, values[0], 16) == 1  # a zero change: rank 1


@pytest.mark.parametrize("rule,value", [("threshold", 0.05), ("threshold", 0.5),
                                        ("ratio", 0.1), ("ratio", 0.02),
                                        ("quantile", 0.5), ("quantile", 0.9)])
def test_extract_rules_pick_lycoris_rank(rule, value):
    from lycoris.utils import extract_linear

    s = torch.tensor([(i + 1) ** -0.8 for i in range(60)], dtype=torch.float64)
    matrix = _with_spectrum(200, 180, s)
    (down, _up, _), mode = extract_linear(matrix, rule, value)
    assert mode == "low rank"  # under half the output size: LyCORIS makes a LoRA
    got = extract_rank(torch.linalg.svdvals(matrix), rule, value, cap=200)
    assert got == down.shape[0]


def test_extract_rules_use_the_totals_of_the_whole_spectrum():
    s = torch.tensor([(i + 1) ** -0.5 for i in range(100)], dtype=torch.float64)
    head = s[:30]
    total_sq, total_sum = float(s.pow(2).sum()), float(s.sum())
    for value in (0.5, 0.7):
        whole = extract_rank(s, "fro", value, cap=30)
        assert extract_rank(head, "fro", value, cap=30, total_sq=total_sq) == whole
        assert extract_rank(head, "quantile", value, cap=30, total_sum=total_sum) == \
            extract_rank(s, "quantile", value, cap=30)
    # fro is kohya's sv_fro
    assert extract_rank(s, "fro", 0.8, cap=100) == _kohya_expected(s.tolist(), "sv_fro", 0.8, 100)
    # a cap below what a rule asks for wins
    assert extract_rank(head, "fro", 0.99, cap=12, total_sq=total_sq) == 12
