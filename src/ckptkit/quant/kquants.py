"""Quantizers of the K-quant types (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K), vectorised in torch.

They follow ggml's reference quantizers (``quantize_row_q{2..6}_K_ref`` in ``ggml-quants.c``),
which are what ``llama-quantize`` runs when it is given no importance matrix (city96's
ComfyUI-GGUF instructions give none): per super-block of 256 values, each sub-block's scale
(and minimum) is searched by ``make_qx_quants``, ``make_q3_quants`` or ``make_qkx2_quants``, the
sub-block scales are quantized to 4, 6 or 8 bits against one fp16 super-scale, and the values
are quantized again against the scales as stored. The searches are per-sub-block loops in C;
here every sub-block of a slice is searched at once, and the loops that remain are over the
candidate scales (19, 16 or 21 of them) or, for ``make_q3_quants``, over the 16 positions of
its coordinate descent, never over blocks.

Rounding is C's ``nearest_int`` (half to even, as ``torch.round``) and the arithmetic is
float32 as in C; sums are reduced in torch's order rather than left to right, so a value
at an exact tie between two candidates may pick the other one: the blocks are the reference
algorithm's, not guaranteed byte for byte (no Python quantizer of these types exists to
compare with; the tests hold their error to bounds measured against the types' designs).

Speed: a candidate costs whole passes over the slice (codes: subtract, scale, round, clip;
the products of the sums; one reduction for the sums) plus a few dozen small ops on one value
per sub-block, so the searches write into buffers made once per call and keep per candidate
only per-sub-block numbers; torch's ``where`` and masked fill, slow on CPU (a few ns a
value against a fraction of one for arithmetic), are kept off full-size tensors. The sums
must stay torch's ``.sum(-1)`` over each row (a matmul or another order would round
differently and change chosen scales): ``tests/test_quant_kquant_search.py`` holds the bytes
to the first vectorised version's.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
_EPS = 1e-15  # GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros


def _f32(value: float) -> float:
    """A constant computed in float32, as the C code computes ``rmin + rdelta*is + nmax``."""
    return float(np.float32(value))


def _fp16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16)


def _fp16_bytes(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _signed_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the value of largest magnitude (sign kept, the first of equals) and that
    magnitude."""
    magnitude = x.abs()
    index = magnitude.argmax(-1, keepdim=True)
    return x.gather(-1, index).squeeze(-1), magnitude.gather(-1, index).squeeze(-1)


def _safe(value: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``value`` with 1 where ``bad``: a divisor for rows whose result is discarded."""
    return torch.where(bad, torch.ones((), dtype=value.dtype), value)


def _unless(value: torch.Tensor, bad: torch.Tensor, fill: float) -> torch.Tensor:
    """``value`` with ``fill`` where ``bad``: ``where``'s result, without its cost when no
    value is bad (a degenerate sub-block is rare, and these run once per candidate)."""
    return torch.where(bad, fill, value) if bad.any() else value


def _zero_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values`` with the rows marked in ``rows`` set to 0, in place (torch's masked fill and
    ``where`` take a few ns a value: skipped when no row is marked, which is nearly always)."""
    if rows.any():
        values.masked_fill_(rows[:, None], 0.0)
    return values


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` on every row of ``x``:
    symmetric codes ``0..2*nmax-1`` and the scale of least squared error weighted by x^2, among
    the scales ``max/-(nmax + 0.1*is)`` for is in -9..9. Each candidate's codes go into one
    buffer and only its sums are kept; the winner's codes are made again at the end from its
    inverse scale (the same products, so the same codes)."""
    top, magnitude = _signed_argmax(x)
    zero = magnitude < _EPS
    top = _safe(top, zero)
    w = x * x
    weights = torch.stack([w * x, w])  # wx and w: one multiply gives both products
    trial = torch.empty_like(x)
    products = torch.empty((2, *x.shape))

    def fit(iscale):
        torch.mul(x, iscale[:, None], out=trial).round_().clamp_(-nmax, nmax - 1)
        torch.mul(weights, trial, out=products)
        products[1].mul_(trial)  # (w * l) * l, in C's order
        return products.sum(-1)  # rows of 16 summed as .sum(-1) sums each row alone

    best_iscale = -nmax / top
    sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2, suml2 == 0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -_f32(nmax + _f32(0.1) * step) / top
        tsumlx, tsuml2 = fit(iscale)
        better = (tsuml2 > 0) & (tsumlx * tsumlx > best * tsuml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, tsumlx / _safe(tsuml2, ~better), scale)
        best = torch.where(better, scale * tsumlx, best)
    levels = torch.mul(x, best_iscale[:, None], out=trial).round_().clamp_(-nmax, nmax - 1)
    codes = _zero_rows(levels.add_(nmax), zero)
    return codes, torch.where(zero, 0.0, scale)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every row: codes from the
    largest magnitude, then up to 5 sweeps of coordinate descent on the x^2-weighted error,
    one position at a time. A row that changes nothing in a sweep would change nothing in the
    next (its sweep would start from the same state), so each sweep after the first runs on
    the rows that changed in the one before: on Gaussian values 20% of them, then 5%, 1%. The
    sweeps work on the values transposed, a position's column contiguous."""
    top, magnitude = _signed_argmax(x)
    zero = magnitude < _EPS
    levels = ((-nmax / _safe(top, zero))[:, None] * x).round().clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = (wx * levels).sum(-1)
    suml2 = (w * levels * levels).sum(-1)
    columns = [v.t().contiguous() for v in (x, w, wx, levels)]
    rows = None  # every row in the first sweep, then those still changing
    for _ in range(5):
        xa, wa, wxa, la = columns if rows is None else (c[:, rows] for c in columns)
        slxa, sl2a = (sumlx, suml2) if rows is None else (sumlx[rows], suml2[rows])
        changed = torch.zeros(la.shape[1], dtype=torch.bool)
        for xi, wi, wxi, li in zip(xa, wa, wxa, la, strict=True):
            slx = slxa - wxi * li
            sl2 = sl2a - wi * li * li
            positive = slx > 0
            new = (xi * sl2 / _safe(slx, ~positive)).round_().clamp_(-nmax, nmax - 1)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take = (positive & (new != li) & (sl2 > 0)
                    & (slx * slx * sl2a > slxa * slxa * sl2))
            li.copy_(torch.where(take, new, li))
            slxa = torch.where(take, slx, slxa)
            sl2a = torch.where(take, sl2, sl2a)
            changed |= take
        if rows is None:
            sumlx, suml2 = slxa, sl2a
        else:
            columns[3][:, rows] = la
            sumlx[rows], suml2[rows] = slxa, sl2a
        if not changed.any():
            break
        still = changed.nonzero().squeeze(1)
        rows = still if rows is None else rows[still]
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 <= 0), 0.0)
    codes = _zero_rows(columns[3].t().contiguous().add_(nmax), zero)
    return codes, torch.where(zero, 0.0, scale)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float,
                     rdelta: float, nstep: int, use_mad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` on every row: codes ``0..nmax`` with a scale and a minimum
    (<= 0), the pair of least weighted error (squared, or absolute with ``use_mad``) among
    the least-squares fits to the codes of the scales ``(rmin + rdelta*is + nmax)/(max - min)``,
    is in 0..nstep. The minimum moves to each better fit, as in C. Gives the codes, the scale
    and the minimum negated (``the_min``).

    The squared error of a fit is not summed value by value as in C but expanded into the
    sums the fit already has (s^2 Swl^2 + 2sm Swl - 2s Swlx + m^2 Sw - 2m Swx + Swx^2),
    combined in float64 so that the cancellation costs nothing. A candidate's codes and
    products go into buffers made once, its three sums are one reduction, and only the
    winner's inverse scale and minimum are kept: its codes are made again at the end (the
    same float operations, so the same codes). A candidate then costs four in-place passes
    for its codes, two multiplies for its three products and one reduction (and five passes
    more for ``use_mad``'s absolute error), with no full-size temporary, where keeping every
    candidate's codes took eight temporaries and a masked select."""
    low = x.amin(-1).clamp(max=0)
    high = x.amax(-1)
    pair = torch.empty((2, *x.shape))  # w and wx: one multiply by the codes gives two terms
    pair[0] = weights
    wx = torch.mul(weights, x, out=pair[1])
    sum_w = weights.sum(-1)
    sum_x = wx.sum(-1)
    sum_x2 = (wx * x).sum(-1).double()
    sum_w64, sum_x64 = sum_w.double(), sum_x.double()
    flat = high == low
    trial = torch.empty_like(x)
    products = torch.empty((3, *x.shape))

    def codes(iscale, low):
        iscale = torch.nan_to_num(iscale, posinf=3e38, neginf=-3e38)
        torch.sub(x, low[:, None], out=trial).mul_(iscale[:, None]).round_().clamp_(0, nmax)
        return iscale

    def sums():
        """Swl, Swxl and Swl^2 of the codes in ``trial``, as rows of one (3, n) tensor."""
        torch.mul(pair, trial, out=products[:2])
        torch.mul(products[0], trial, out=products[2])  # (w * l) * l, in C's order
        return products.sum(-1)  # each row of the three summed alone, as .sum(-1) of one

    def error(scale, low, totals):
        if use_mad:
            diff = torch.mul(trial, scale[:, None], out=products[0])  # its sum is taken
            diff.add_(low[:, None]).sub_(x)
            return diff.abs_().mul_(weights).sum(-1)
        sum_l, sum_xl, sum_l2 = totals.double()
        s, m = scale.double(), low.double()
        twice = 2 * s
        return (s * s * sum_l2 + twice * m * sum_l - twice * sum_xl + m * m * sum_w64
                - 2 * m * sum_x64 + sum_x2)

    iscale = nmax / _safe(high - low, flat)
    scale = 1 / iscale
    best_iscale, best_low = codes(iscale, low), low
    best = error(scale, low, sums())
    for step in range(nstep + 1):
        span = high - low
        iscale = codes(_f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)
                       / _unless(span, span == 0, 1.0), low)
        totals = sums()
        sum_l, sum_xl, sum_l2 = totals
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = det > 0
        det = _unless(det, ~fits, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        if clipped.any():  # the least-squares minimum is above 0: fit the scale alone
            this_min = torch.where(clipped, 0.0, this_min)
            this_scale = torch.where(clipped, sum_xl / _safe(sum_l2, sum_l2 == 0), this_scale)
        current = error(this_scale, this_min, totals)
        better = fits & (current < best)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_low = torch.where(better, low, best_low)
        best = torch.where(better, current, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    codes(best_iscale, best_low)
    return _zero_rows(trial, flat), torch.where(flat, 0.0, scale), -low


def _requantize(x, step, offset, low, high, keep):
    """Codes of ``x`` against the stored sub-block scales ``step`` (per sub-block, last dim 1)
    and offsets: ``nearest_int((x + offset)/step)`` clipped, or ``keep`` where the step is 0
    (C's ``if (!d) continue``)."""
    zero = step == 0
    fresh = ((x + offset) / _safe(step, zero)).round_().clamp_(low, high)
    return torch.where(zero, keep, fresh) if zero.any() else fresh


def _crumbs(levels: torch.Tensor) -> torch.Tensor:
    """2-bit codes packed four to a byte, ggml's layout for Q2_K and Q3_K: per half of 128,
    byte l holds codes l, l+32, l+64, l+96 from the low bits up."""
    q = levels.to(torch.uint8).view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(
        -1, 64)


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    x = blocks.view(n, 16, 16)
    levels, scales = make_qx_quants(x.reshape(-1, 16), 32)
    levels, scales = levels.view(n, 16, 16), scales.view(n, 16)
    top, magnitude = _signed_argmax(scales)
    empty = magnitude < _EPS
    iscale = -128 / _safe(top, empty)
    d = _fp16(1 / iscale)
    stored = (iscale[:, None] * scales).round().clamp(max=127)
    step = (d.float()[:, None] * stored)[..., None]
    levels = _requantize(x, step, 0.0, -32, 31, levels - 32) + 32
    q = levels.to(torch.uint8).view(n, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                    (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n, 64)
    out = torch.cat([ql, qh, stored.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], 1)
    out[empty] = 0  # an all-zero super-block is stored as zero bytes
    return out


def _k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit minimums in the 12 bytes of Q4_K and Q5_K."""
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], 1).to(torch.uint8)


def _six_bits(values: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``MIN(63, (uint8_t) nearest_int(inverse * value))`` as int64."""
    return ((inverse[:, None] * values).round().to(torch.int64) & 0xFF).clamp(max=63)


def _qk_scaled(blocks, nmax, rmin, rdelta, nstep):
    """What Q4_K and Q5_K share: sub-blocks of 32 fitted by ``make_qkx2_quants`` with weights
    ``rms + |x|``, their scales and minimums quantized to 6 bits against two fp16 maxima, and
    the values quantized again against them. Gives the codes, the 12 scale bytes, d and dmin."""
    n = blocks.shape[0]
    x = blocks.view(n, 8, 32)
    rms = ((x * x).sum(-1, keepdim=True) / 32).sqrt()
    levels, scales, mins = make_qkx2_quants(x.reshape(-1, 32), (rms + x.abs()).reshape(-1, 32),
                                            nmax, rmin, rdelta, nstep, False)
    levels, scales, mins = levels.view(n, 8, 32), scales.view(n, 8), mins.view(n, 8)
    max_scale = scales.amax(-1).clamp(min=0)
    max_min = mins.amax(-1).clamp(min=0)
    ls = _six_bits(scales, torch.where(max_scale > 0, 63 / _safe(max_scale, max_scale <= 0), 0))
    lm = _six_bits(mins, torch.where(max_min > 0, 63 / _safe(max_min, max_min <= 0), 0))
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    step = (d.float()[:, None] * ls)[..., None]
    offset = (dmin.float()[:, None] * lm)[..., None]
    levels = _requantize(x, step, offset, 0, nmax, levels)
    return levels.to(torch.uint8), _k_scales(ls, lm), _fp16_bytes(d), _fp16_bytes(dmin)


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    levels, scales, d, dmin = _qk_scaled(blocks, 15, -1.0, 0.1, 20)
    q = levels.view(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d, dmin, scales, qs], 1)


def q5_k(blocks: torch.Tensor) -> torch.Tensor:
    levels, scales, d, dmin = _qk_scaled(blocks, 31, -0.5, 0.1, 15)
    q = levels.view(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    shifts = (2 * torch.arange(4, dtype=torch.uint8)).view(1, 4, 1)
    high = (((q[:, :, 0] >> 4) << shifts) | ((q[:, :, 1] >> 4) << (shifts + 1)))
    qh = high.sum(1, dtype=torch.uint8)  # disjoint bits: the sum is the OR
    return torch.cat([d, dmin, scales, qh, qs], 1)


def q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    x = blocks.view(n, 16, 16)
    levels, scales = make_q3_quants(x.reshape(-1, 16), 4)
    levels, scales = levels.view(n, 16, 16), scales.view(n, 16)
    top, _ = _signed_argmax(scales)
    some = top != 0
    iscale = -32 / _safe(top, ~some)
    stored = torch.where(some[:, None], (iscale[:, None] * scales).round().clamp(-32, 31) + 32,
                         0).to(torch.int64)
    d = torch.where(some, _fp16(1 / iscale).float(), 0.0)
    step = (d[:, None] * (stored - 32))[..., None]
    levels = _requantize(x, step, 0.0, -4, 3, levels - 4) + 4
    packed = torch.cat([(stored[:, :8] & 0xF) | ((stored[:, 8:] & 0xF) << 4),
                        ((stored >> 4).view(n, 4, 4) << (2 * torch.arange(4)).view(1, 4, 1)
                         ).sum(1)], 1).to(torch.uint8)
    q = levels.to(torch.uint8).view(n, 8, 32)
    hmask = ((q >> 2) << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)).sum(
        1, dtype=torch.uint8)
    return torch.cat([hmask, _crumbs(q & 3), packed, _fp16_bytes(_fp16(d))], 1)


def q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    x = blocks.view(n, 16, 16)
    flat = x.reshape(-1, 16)
    levels, scales, mins = make_qkx2_quants(flat, flat.abs(), 3, -0.5, 0.1, 15, True)
    levels, scales, mins = levels.view(n, 16, 16), scales.view(n, 16), mins.view(n, 16)
    max_scale = scales.amax(-1).clamp(min=0)
    max_min = mins.amax(-1).clamp(min=0)
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = ((15 / _safe(max_scale, ~has_scale))[:, None] * scales).round().to(torch.int64)
    lm = ((15 / _safe(max_min, ~has_min))[:, None] * mins).round().to(torch.int64)
    byte = (torch.where(has_scale[:, None], ls, 0) & 0xFF) | (
        (torch.where(has_min[:, None], lm, 0) << 4) & 0xFF)
    d = torch.where(has_scale, _fp16(max_scale / 15).float(), 0.0)
    dmin = torch.where(has_min, _fp16(max_min / 15).float(), 0.0)
    step = (d[:, None] * (byte & 0xF))[..., None]
    offset = (dmin[:, None] * (byte >> 4))[..., None]
    levels = _requantize(x, step, offset, 0, 3, levels)
    return torch.cat([byte.to(torch.uint8), _crumbs(levels), _fp16_bytes(_fp16(d)),
                      _fp16_bytes(_fp16(dmin))], 1)


K_QUANTIZERS = {"Q6_K": q6_k, "Q5_K": q5_k, "Q4_K": q4_k, "Q3_K": q3_k, "Q2_K": q2_k}
