"""Our merge methods against sd-mecha 1.1.8's implementations of the same methods (called as
plain functions through ``__wrapped__``, on the same tensors): weighted sum, add difference,
SLERP, train difference (its mask, used with add difference as its recipes do), TIES (sign
election by mass, as its ``vote_sgn=True`` and the TIES paper do; compared without trimming,
since sd-mecha's top-k keeps one entry more than the fraction asked) and Model Stock (two
fine-tunes; on 1-D tensors, where its per-row cosine is the whole one)."""

from __future__ import annotations

import torch
from sd_mecha.extensions.builtin.merge_methods import linear, ties

from ckptkit.ops import merge_methods as ours


def _tensors(n: int, shape=(64, 48), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_weighted_sum_add_difference_slerp():
    a, b, c = _tensors(3)
    key = "k"
    alpha = torch.tensor(0.3)
    theirs = linear.weighted_sum.__wrapped__({key: a}, {key: b}, alpha=alpha, key=key)
    assert torch.allclose(ours.weighted_sum([a, b], 0.3), theirs, atol=1e-6)
    theirs = linear.add_difference.__wrapped__({key: a}, {key: b - c}, alpha=torch.tensor(0.7),
                                               key=key)
    assert torch.allclose(ours.add_difference([a, b, c], 0.7), theirs, atol=1e-6)
    for t in (0.0, 0.35, 0.8):
        theirs = linear.slerp.__wrapped__(a, b, alpha=torch.tensor(t))
        assert torch.allclose(ours.slerp([a, b], t), theirs, atol=1e-5)


def test_ties_sign_election_and_disjoint_mean():
    base, *models = _tensors(4, seed=1)
    deltas = [m - base for m in models]
    theirs = base + 0.9 * ties.ties_sum.__wrapped__(*deltas, k=1.0, vote_sgn=True)
    assert torch.allclose(ours.ties([base, *models], alpha=0.9, density=1.0), theirs, atol=1e-6)


def test_model_stock_with_two_fine_tunes():
    base, m1, m2 = _tensors(3, shape=(512,), seed=2)
    m1, m2 = base + 0.1 * (m1 - base), base + 0.1 * (m2 + m1 - 2 * base)  # correlated tunes
    delta = ties.model_stock.__wrapped__(m1 - base, m2 - base)
    assert torch.allclose(ours.model_stock([base, m1, m2]), base + delta, atol=1e-5)


def test_train_difference_is_add_difference_with_sd_mechas_mask():
    a, b, c = _tensors(3, seed=3)
    b[0] = c[0]  # a row where B equals C: nothing is added there
    mask = linear.train_difference_mask.__wrapped__(a, b, c, alpha=torch.tensor(0.6))
    theirs = linear.add_difference.__wrapped__({"k": a}, {"k": b - c}, alpha=mask, key="k")
    got = ours.train_difference([a, b, c], 0.6)
    assert torch.allclose(got, theirs, atol=1e-6)
    assert torch.equal(got[0], a[0])


def test_narrow_weighted_sum_is_bit_identical_to_the_fp32_path():
    """16-bit inputs are merged by torch.lerp on the stored values (fp32 inside the kernel):
    the same bits as widening to fp32, lerp, and rounding back; odd lengths reach the
    kernel's scalar tail."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16):
        for n in (1, 7, 1_000_003):
            a = (torch.randn(n, generator=gen) * 4).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            for alpha in (0.0, 0.123, 0.5, 0.77, 1.0):
                wide = ours.weighted_sum([a.float(), b.float()], alpha).to(dtype)
                narrow = ours.METHODS["weighted-sum"].narrow([a, b], alpha)
                assert torch.equal(narrow.view(torch.int16), wide.view(torch.int16))
