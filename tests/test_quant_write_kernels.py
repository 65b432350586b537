"""ckptkit's GGML quantizers against the gguf package (llama.cpp's own Python code).

For the types the gguf package can write, our bytes must be its bytes, awkward values
included. For the K-quants, which it can only read, our blocks must dequantize (with its
code) to values within the type's error of the source, and our reader must agree with its
reader on our bytes; a plain transcription of ggml's C reference for Q4_K and Q6_K (slow,
one value at a time, float32 throughout) checks that the vectorised searches are the same
algorithm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptkit.ops.quantize import ERROR_BOUNDS
from ckptkit.quant.dequant import dequantize
from ckptkit.quant.encode import quantize

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

WRITABLE_BY_GGUF = ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "BF16", "F16"]
K_TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def _theirs(x: np.ndarray, qtype: str) -> bytes:
    return gguf.quants.quantize(x, getattr(T, qtype)).tobytes()


def _ours(x: np.ndarray, qtype: str) -> bytes:
    return quantize(torch.from_numpy(x), qtype).numpy().tobytes()


def _awkward() -> np.ndarray:
    """Rows of 32 that stress the rounding: zeros, a constant, exact halves (ties for every
    type's rounding), the largest magnitude twice with both signs, one value far above the
    rest, huge and tiny scales, fp16's edge."""
    rows = [
        np.zeros(32),
        np.full(32, 0.7),
        np.arange(32) - 15.5,
        (np.arange(32) - 16) / 8,  # Q4_0: x/d + 8.5 lands on whole numbers
        np.where(np.arange(32) % 2, 3.0, -3.0),
        np.r_[np.full(31, 1e-3), 1e3],
        np.linspace(-1, 1, 32) * 1e30,  # scales beyond fp16: inf, as ggml stores them
        np.linspace(-1, 1, 32) * 1e-30,
        np.linspace(-65504, 65504, 32),
        np.r_[np.full(16, -2.0), np.full(16, 2.0)],
        np.full(32, -5.0),
        np.arange(32) * 127 / 31 * 0.5,
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("qtype", WRITABLE_BY_GGUF)
def test_same_bytes_as_gguf_on_gaussian_and_awkward_values(qtype):
    rng = np.random.default_rng(7)
    gaussian = rng.standard_normal((48, 512)).astype(np.float32)
    with np.errstate(all="ignore"):
        assert _ours(gaussian, qtype) == _theirs(gaussian, qtype)
        assert _ours(_awkward(), qtype) == _theirs(_awkward(), qtype)


_values = st.one_of(st.just(0.0), st.floats(2.0 ** -60, 1e6, width=32),
                    st.floats(-1e6, -(2.0 ** -60), width=32))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (3, 64), elements=_values), st.sampled_from(WRITABLE_BY_GGUF))
def test_same_bytes_as_gguf_on_any_values(x, qtype):
    with np.errstate(all="ignore"):
        assert _ours(x, qtype) == _theirs(x, qtype)


def test_bf16_source_values_stay_bit_exact():
    x = torch.randn(4, 64).to(torch.bfloat16)
    back = quantize(x, "BF16").view(torch.bfloat16).reshape(4, 64)
    assert torch.equal(back, x)


def _relative_rms(back: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(((back - x) ** 2).sum() / (x ** 2).sum()))


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_dequantize_within_their_bound_and_both_readers_agree(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    x[0] = rng.laplace(size=1024)  # heavier tails
    x[1, :256] = 0  # an all-zero super-block
    x[2, 256:512] = 1.5  # a constant one
    x[3, 512:768] = -np.abs(x[3, 512:768])  # negative only (K minimums at the top)
    x[4, 5] = 40.0  # one outlier
    stored = quantize(torch.from_numpy(x), qtype)
    theirs = gguf.quants.dequantize(stored.numpy().reshape(32, -1), getattr(T, qtype))
    ours = dequantize(stored, qtype, x.shape).numpy()
    assert np.array_equal(ours, theirs)
    assert np.all(theirs[1, :256] == 0)
    assert np.allclose(theirs[2, 256:512], 1.5, rtol=0.05)
    assert _relative_rms(theirs, x) < ERROR_BOUNDS[qtype] / 2 * 1.2  # ~ the Gaussian figure


@pytest.mark.parametrize("qtype", WRITABLE_BY_GGUF + K_TYPES)
def test_error_bounds_hold_twice_over_on_gaussian_values(qtype):
    """The bounds are twice the Gaussian error: measure it again, each type well inside."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(11))
    back = dequantize(quantize(x, qtype), qtype, tuple(x.shape))
    error = float(((back - x).pow(2).sum() / x.pow(2).sum()).sqrt())
    assert ERROR_BOUNDS[qtype] / 2.5 < error < ERROR_BOUNDS[qtype] / 1.8


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="not whole Q4_K blocks"):
        quantize(torch.zeros(4, 96), "Q4_K")


# -- ggml's C reference, transcribed value by value (float32 throughout) -------------------

f32 = np.float32


def _nearest_int(v) -> int:
    return int(np.rint(f32(v)))  # C's nearest_int: round half to even


def _ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = f32(x[0]), f32(x[0])
    sum_w = f32(w[0])
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    mn = min(mn, f32(0))
    if mx == mn:
        return [0] * n, f32(0), f32(-mn)
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    levels = [max(0, min(nmax, _nearest_int(f32(iscale * f32(x[i] - mn))))) for i in range(n)]
    best = f32(0)
    for i in range(n):
        diff = f32(f32(f32(scale * levels[i]) + mn) - x[i])
        best = f32(best + f32(w[i] * f32(diff * diff)))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax) / f32(mx - mn))
        trial = [max(0, min(nmax, _nearest_int(f32(iscale * f32(x[i] - mn)))))
                 for i in range(n)]
        sum_l = sum_l2 = sum_xl = f32(0)
        for i in range(n):
            sum_l = f32(sum_l + f32(w[i] * trial[i]))
            sum_l2 = f32(sum_l2 + f32(f32(w[i] * trial[i]) * trial[i]))
            sum_xl = f32(sum_xl + f32(f32(w[i] * trial[i]) * x[i]))
        det = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / det)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sum_xl / sum_l2)
            current = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * trial[i]) + this_min) - x[i])
                current = f32(current + f32(w[i] * f32(diff * diff)))
            if current < best:
                levels, best, scale, mn = trial, current, this_scale, this_min
    return levels, scale, f32(-mn)


def _ref_q4_k(x):
    """quantize_row_q4_K_ref for one super-block of 256: its 144 bytes."""
    levels, scales, mins = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        av_x = f32(np.sqrt(f32(sum(f32(v * v) for v in sub) / 32)))
        w = [f32(av_x + abs(v)) for v in sub]
        lv, sc, mn = _ref_make_qkx2(sub, w, 15, -1.0, 0.1, 20)
        levels += lv
        scales.append(sc)
        mins.append(mn)
    max_scale, max_min = max([f32(0), *scales]), max([f32(0), *mins])
    inv_scale = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(63 / max_min) if max_min > 0 else f32(0)
    ls = [min(63, _nearest_int(f32(inv_scale * s)) & 0xFF) for s in scales]
    lm = [min(63, _nearest_int(f32(inv_min * m)) & 0xFF) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d = np.float16(max_scale / f32(63))
    dmin = np.float16(max_min / f32(63))
    for j in range(8):
        step = f32(f32(d) * ls[j])
        if step:
            offset = f32(f32(dmin) * lm[j])
            for i in range(32 * j, 32 * j + 32):
                levels[i] = max(0, min(15, _nearest_int(f32(f32(x[i] + offset) / step))))
    qs = [levels[64 * k + i] | (levels[64 * k + 32 + i] << 4) for k in range(4)
          for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def _ref_make_qx(x, nmax):
    n = len(x)
    amax, top = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, top = abs(v), v
    if amax < f32(1e-15):
        return [0] * n, f32(0)

    def fit(iscale):
        sumlx = suml2 = f32(0)
        levels = []
        for v in x:
            level = max(-nmax, min(nmax - 1, _nearest_int(f32(iscale * v))))
            levels.append(level + nmax)
            w = f32(v * v)
            sumlx = f32(sumlx + f32(f32(w * v) * level))
            suml2 = f32(suml2 + f32(f32(w * level) * level))
        return levels, sumlx, suml2

    levels, sumlx, suml2 = fit(f32(-nmax / top))
    scale = f32(sumlx / suml2) if suml2 else f32(0)
    best = f32(scale * sumlx)
    for step in range(-9, 10):
        if step:
            trial, tsumlx, tsuml2 = fit(f32(-f32(nmax + f32(f32(0.1) * step)) / top))
            if tsuml2 > 0 and f32(tsumlx * tsumlx) > f32(best * tsuml2):
                levels, scale = trial, f32(tsumlx / tsuml2)
                best = f32(scale * tsumlx)
    return levels, scale


def _ref_q6_k(x):
    """quantize_row_q6_K_ref for one super-block of 256: its 210 bytes."""
    levels, scales = [], []
    for j in range(16):
        lv, sc = _ref_make_qx(x[16 * j:16 * j + 16], 32)
        levels += lv
        scales.append(sc)
    top = max(scales, key=abs)  # the first of equal magnitudes, as C's strict >
    iscale = f32(-128 / top)
    d = np.float16(f32(1) / iscale)
    stored = [min(127, _nearest_int(f32(iscale * s))) for s in scales]
    for j in range(16):
        step = f32(f32(d) * stored[j])
        if step:
            for i in range(16 * j, 16 * j + 16):
                levels[i] = max(-32, min(31, _nearest_int(f32(x[i] / step)))) + 32
    ql, qh = [], []
    for h in range(2):
        q = [levels[128 * h + 32 * k:128 * h + 32 * k + 32] for k in range(4)]
        ql += [(q[0][i] & 0xF) | ((q[2][i] & 0xF) << 4) for i in range(32)]
        ql += [(q[1][i] & 0xF) | ((q[3][i] & 0xF) << 4) for i in range(32)]
        qh += [(q[0][i] >> 4) | ((q[1][i] >> 4) << 2) | ((q[2][i] >> 4) << 4)
               | ((q[3][i] >> 4) << 6) for i in range(32)]
    return bytes(ql) + bytes(qh) + np.array(stored, np.int8).tobytes() + d.tobytes()


@pytest.mark.parametrize(("qtype", "reference"), [("Q4_K", _ref_q4_k), ("Q6_K", _ref_q6_k)])
def test_k_quant_searches_are_ggmls_reference(qtype, reference):
    """Block by block the same bytes as the C reference transcribed; sums reduced in another
    order may break an exact tie differently, so a block or two of many may differ (by a code
    or the choice between two equally good scales)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[5] *= rng.exponential(size=256).astype(np.float32)
    ours = quantize(torch.from_numpy(x), qtype).numpy().reshape(6, -1)
    same = sum(ours[i].tobytes() == reference([f32(v) for v in x[i]]) for i in range(6))
    assert same >= 5
