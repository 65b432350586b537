"""Adapter math: each adapter type a small pure function that patches one weight (fp32 in,
fp32 out).

A function gets the base weight ``w`` (the rows of the target tensor the module lands on),
the module's tensors ``t`` by role (fp32), its ``alpha`` (None when the file has none), the
``strength`` and ``rows``: which rows of the module's own output ``w`` holds (None: all of
them; a slice when a fused module's rows land on separate tensors). It returns the patched
``w``. The bake reads, casts and writes; a function never sees files, keys or dtypes.

Scale is alpha / rank, alpha missing or 0 meaning alpha = rank (scale 1), as kohya's and
LyCORIS's trainers define it; the rank of each type is the one its trainer uses (below).
Formulas, checked at their sources (kohya ``networks/*.py``, LyCORIS ``lycoris/modules``,
ComfyUI ``comfy/weight_adapter``, PEFT ``tuners/lora``) and tested against PEFT and
lycoris-lora themselves:

- LoRA / LoCon: ΔW = up @ down (convolutions: up (out, r, 1, 1) times down (r, in, k, k));
  with a Tucker ``mid`` (r, r, k, k): ΔW = mid x_0 up x_1 down. Rank: down's rows.
- LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker t1/t2 each half is t x_0 wa x_1 wb.
  Rank: w1b's rows.
- LoKr: ΔW = kron(w1 or w1a @ w1b, w2 or w2a @ w2b or Tucker(t2, w2a, w2b)). Rank: the
  factored half's (w1's first, as LyCORIS); with both halves full the scale is 1 whatever
  alpha says (LyCORIS and ComfyUI agree).
- GLoRA: ΔW = W a1 a2 + b1 b2 (LyCORIS's layout; the older one, W a2 a1 + b2 b1, is told
  apart by shapes as ComfyUI does). Rank: a2's rows (a1's in the old layout).
- Full difference (``diff``): ΔW = diff; biases get ``diff_b``. ``set``: the weight replaced (BFL
  control LoRAs' norm scales), unless the strength is 0 (ComfyUI then skips the LoRA).
  These ignore alpha. (IA)^3 has no function here: ``lora.targets`` refuses it, as ComfyUI
  and diffusers do not apply it either (it scales activations at run time; a user baking one
  expects what their loader shows).

The adapter names and roles are ``lora.modules``'. All of the above give W + s scale ΔW,
except:

- **DoRA** (``dora_scale``, PEFT's ``lora_magnitude_vector``) on LoRA, LoHa, LoKr or GLoRA:
  D = m ⊙ (W + scale ΔW) / ||W + scale ΔW||, and at strength s the result is W + s (D - W),
  as ComfyUI, Forge and AUTOMATIC1111 do: strength 0 is the base model, 1 is the adapter as
  trained, and in between a straight line, so a bake matches what those tools show at the
  same strength. PEFT scales ΔW inside the normalisation instead (s = 0 still rescales W to
  m) and LyCORIS scales the magnitude ratio (s = 0 gives W + ΔW). The norm's axis follows
  m's shape: (out,) or (out, 1, ...) per output row (PEFT, LyCORIS's default), (1, in, ...)
  per input column (older kohya/LyCORIS files); on either axis it is the norm of the
  adapted weight W + scale ΔW, as PEFT and LyCORIS take it (ComfyUI takes the norm of W
  alone on the output axis, which stops m from being the adapted weight's norm). Equal to
  PEFT's merge at strength 1, to LyCORIS's on the input axis.
- **OFT** (``oft_blocks`` (n, b, b)): Q = B - B^T, its Frobenius norm clamped to
  alpha * out (alpha > 0), R = (I + Q)(I - Q)^-1, W' = rescale ⊙ blockdiag(s R + (1-s) I)^T W.
  The clamp is kohya's and LyCORIS's, the trainers that write these files: the weights were
  trained under that constraint, so a bake must apply the same one. ComfyUI clamps to alpha
  alone (a far tighter limit that changes trained weights whose norm lies between the two)
  and applies strength twice (s^2 away from 1). Equal to LyCORIS's DiagOFTModule.
- **BOFT** (``oft_blocks`` (m, n, b, b)): the m butterfly stages of LyCORIS, each block
  blended toward the identity by strength, the same clamp as OFT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Tensors = Mapping[str, "torch.Tensor"]
Rows = slice | None
Shapes = Mapping[str, tuple[int, ...]]


class AdapterError(ValueError):
    """A module whose tensors do not fit together or cannot be applied as asked."""


def scale(alpha: float | None, rank: int) -> float:
    """alpha / rank; a missing or zero alpha means alpha = rank (kohya's and LyCORIS's rule)."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


def _rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x if rows is None else x[rows]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """core (r, r, *k) times up (out, r) on its first axis and down (r, in) on its second:
    (out, in, *k)."""
    import torch

    return torch.einsum("m n ..., i m, n j -> i j ...", core, up, down)


def _fit(delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if delta.numel() != w.numel():
        raise AdapterError(f"the change has shape {tuple(delta.shape)}, the weight "
                           f"{tuple(w.shape)}")
    return delta.reshape(w.shape)


# ---- the change each low-rank type makes, unscaled (rows of the module's output) ----

def lora_delta(t: Tensors, rows: Rows, w: torch.Tensor) -> torch.Tensor:
    up = _rows(_flat(t["up"]), rows)
    down = t["down"]
    if "mid" in t:
        return _fit(_tucker(t["mid"], up, _flat(down)), w)
    if up.shape[1] != down.shape[0]:
        raise AdapterError(f"up {tuple(t['up'].shape)} does not fit down {tuple(down.shape)}")
    return _fit(up @ _flat(down), w)


def loha_delta(t: Tensors, rows: Rows, w: torch.Tensor) -> torch.Tensor:
    if "t1" in t:  # Tucker: w?_a (r, out), w?_b (r, in), t? (r, r, *k)
        half1 = _tucker(t["t1"], _rows(t["w1a"].T, rows), t["w1b"])
        half2 = _tucker(t["t2"], _rows(t["w2a"].T, rows), t["w2b"])
        return _fit(half1 * half2, w)
    half1 = _rows(t["w1a"], rows) @ _flat(t["w1b"])
    half2 = _rows(t["w2a"], rows) @ _flat(t["w2b"])
    return _fit(half1 * half2, w)


def lokr_delta(t: Tensors, rows: Rows, w: torch.Tensor) -> torch.Tensor:
    import torch

    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:  # w2_a (r, out2), w2_b (r, in2)
        w2 = _tucker(t["t2"], t["w2a"].T, t["w2b"])
    else:
        w2 = t["w2a"] @ _flat(t["w2b"])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    full = torch.kron(w1.contiguous(), w2.contiguous())
    out = full.shape[0]
    return _fit(_rows(full.reshape(out, -1), rows), w)


def _glora_old(t: Tensors, w: torch.Tensor, out: int) -> bool:
    """The older LyCORIS layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)), told
    apart by shapes as ComfyUI does: the new one wins unless only the old one fits or the
    layer is r x r square."""
    a1, a2, b1, b2 = (t[k].shape for k in ("a1", "a2", "b1", "b2"))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    return old and (not new or a2[0] == out == w.shape[1])


def glora_delta(t: Tensors, rows: Rows, w: torch.Tensor, out: int) -> torch.Tensor:
    import torch

    a1, a2, b1, b2 = (_flat(t[k]) for k in ("a1", "a2", "b1", "b2"))
    if _glora_old(t, w, out):
        a1, a2, b1, b2 = a2, a1, b2, b1
    wa = torch.einsum("o i ..., i j -> o j ...", w, a1)  # W a1 first: r columns, not in
    wa = torch.einsum("o i ..., i j -> o j ...", wa, a2)
    return wa + _fit(_rows(b1, rows) @ b2, w)


def glora_rank(shapes: Shapes, out: int, cols: int) -> int:
    a1, a2, b1, b2 = (shapes[k] for k in ("a1", "a2", "b1", "b2"))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    return a1[0] if old and (not new or a2[0] == out == cols) else a2[0]


# ---- DoRA ----

def _dora_on_output(m: torch.Tensor, out: int) -> bool:
    """(out,) or (out, 1, ...) (LyCORIS wd_on_out): per output row; (1, in, ...): per input
    column. PEFT's magnitude is always per output row but (1, out, 1, 1) on a convolution,
    which only its format tells apart from (1, in, 1, 1) when in = out: the caller passes it
    flattened."""
    return m.dim() == 1 or (m.shape[0] == out and m[0].numel() == 1)


def dora(w: torch.Tensor, adapted: torch.Tensor, m: torch.Tensor, strength: float,
         rows: Rows, out: int) -> torch.Tensor:
    """W + s (m ⊙ W_c / ||W_c|| - W), W_c = ``adapted`` (W + scale ΔW)."""
    import torch

    eps = torch.finfo(torch.float32).eps
    if _dora_on_output(m, out):
        norm = _flat(adapted).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        mag = _rows(m.reshape(-1), rows).reshape(norm.shape)
    else:
        if rows is not None:
            raise AdapterError("DoRA normalised per input column needs the whole weight")
        norm = adapted.transpose(0, 1).reshape(adapted.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (w.dim() - 2))
        mag = m.reshape(norm.shape)
    decomposed = adapted * (mag / (norm + eps))
    return decomposed if strength == 1 else w + strength * (decomposed - w)


# ---- the patch functions (one per adapter type) ----

def _low_rank(delta: Callable[..., torch.Tensor], rank: Callable[[Shapes], int]):
    """The patch of a type whose change is scale ΔW (DoRA when the module has a magnitude)."""

    def patch(w: torch.Tensor, t: Tensors, alpha: float | None, strength: float,
              rows: Rows, out: int) -> torch.Tensor:
        k = scale(alpha, rank({r: tuple(x.shape) for r, x in t.items()}))
        d = delta(t, rows, w)
        if "dora_scale" in t:
            return dora(w, w + k * d, t["dora_scale"], strength, rows, out)
        return w + (strength * k) * d
    return patch


def _glora(w, t, alpha, strength, rows, out):
    k = scale(alpha, glora_rank({r: tuple(x.shape) for r, x in t.items()}, out, w.shape[1]))
    d = glora_delta(t, rows, w, out)
    if "dora_scale" in t:
        return dora(w, w + k * d, t["dora_scale"], strength, rows, out)
    return w + (strength * k) * d


def _cayley(blocks: torch.Tensor, alpha: float | None, out: int) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 per block, Q = B - B^T with ||Q|| clamped to alpha * out."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if alpha is not None and alpha > 0:
        limit = alpha * out
        norm = q.norm() + 1e-8
        if norm > limit:
            q = q * (limit / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q)  # (I - Q)^-1 commutes with (I + Q)


def _rescale(x: torch.Tensor, t: Tensors, rows: Rows) -> torch.Tensor:
    if "rescale" not in t:
        return x
    return x * _rows(t["rescale"].reshape(-1), rows).reshape(-1, *[1] * (x.dim() - 1))


def _oft(w, t, alpha, strength, rows, out):
    import torch

    blocks = t["blocks"]
    n, b, _ = blocks.shape
    r = _cayley(blocks, alpha, n * b)
    if rows is not None:
        start, stop = rows.start or 0, rows.stop
        if start % b or stop % b:
            raise AdapterError(f"rows {start}:{stop} split OFT blocks of {b}")
        r = r[start // b: stop // b]
    eye = torch.eye(b, dtype=r.dtype, device=r.device)
    r = strength * r + (1 - strength) * eye
    rest = w.shape[1:]
    rotated = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(-1, b, *rest))
    return _rescale(rotated.reshape(w.shape), t, rows)


def _boft(w, t, alpha, strength, rows, out):
    import torch

    if rows is not None:
        raise AdapterError("BOFT mixes all rows of the module and needs the whole weight")
    blocks = t["blocks"]
    stages, n, b, _ = blocks.shape
    r = _cayley(blocks, alpha, n * b)
    eye = torch.eye(b, dtype=r.dtype, device=r.device)
    rest = w.shape[1:]
    x = w
    for i in range(stages):
        ri = strength * r[i] + (1 - strength) * eye
        span = 2 ** i * (b // 2)  # stage i pairs rows span apart
        x = x.reshape(-1, 2, span, *rest).transpose(1, 2).reshape(n, b, *rest)
        x = torch.einsum("n i j, n j ... -> n i ...", ri, x)
        x = x.reshape(-1, span, 2, *rest).transpose(1, 2).reshape(w.shape)
    return _rescale(x, t, rows)


def _full(w, t, alpha, strength, rows, out):
    return w + strength * _fit(_rows(_flat(t["diff"]), rows), w)


def _set(w, t, alpha, strength, rows, out):
    return w if strength == 0 else _fit(_rows(t["set"].reshape(out, -1), rows), w).clone()


def _lokr_rank(s: Shapes) -> int:
    if "w1b" in s:
        return s["w1b"][0]
    if "w2b" in s:
        return s["w2b"][0]
    return 0  # both halves full: scale 1 whatever alpha says


_lokr_low_rank = _low_rank(lokr_delta, _lokr_rank)
_dora_lora = _low_rank(lora_delta, lambda s: s["down"][0])


def _lora(w, t, alpha, strength, rows, out):
    """Plain LoRA in one ``addmm``: no ΔW the size of the weight beside the result."""
    import torch

    if "mid" in t or "dora_scale" in t:
        return _dora_lora(w, t, alpha, strength, rows, out)
    up, down = _rows(_flat(t["up"]), rows), _flat(t["down"])
    if up.shape[1] != down.shape[0] or w.numel() != up.shape[0] * down.shape[1]:
        raise AdapterError(f"up {tuple(t['up'].shape)} and down {tuple(t['down'].shape)} do "
                           f"not make a change of the weight's shape {tuple(w.shape)}")
    k = scale(alpha, down.shape[0])
    return torch.addmm(_flat(w), up, down, alpha=strength * k).reshape(w.shape)


def _lokr(w, t, alpha, strength, rows, out):
    if "w1b" not in t and "w2b" not in t:
        alpha = None
    return _lokr_low_rank(w, t, alpha, strength, rows, out)


Patch = Callable[["torch.Tensor", Tensors, "float | None", float, Rows, int], "torch.Tensor"]


@dataclass(frozen=True)
class Adapter:
    name: str
    patch: Patch  # (w, t, alpha, strength, rows, out) -> patched w
    formula: str


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("lora", _lora,
            "W + s alpha/r up @ down (LoCon; Tucker mid)"),
    Adapter("loha", _low_rank(loha_delta, lambda s: s["w1b"][0]),
            "W + s alpha/r (w1a @ w1b) * (w2a @ w2b) (Tucker t1, t2)"),
    Adapter("lokr", _lokr, "W + s alpha/r kron(w1, w2), each half full or factored (Tucker t2)"),
    Adapter("glora", _glora, "W + s alpha/r (W a1 a2 + b1 b2)"),
    Adapter("oft", _oft,
            "rescale * blockdiag(s R + (1 - s) I)^T W, R = Cayley(B - B^T clamped to alpha out)"),
    Adapter("boft", _boft, "butterfly stages of s R + (1 - s) I applied to W, times rescale"),
    Adapter("dora", _dora_lora, "DoRA: W + s (dora_scale (W + alpha/r up @ down) / ||.|| - W)"),
    Adapter("diff", _full, "W + s diff"),
    Adapter("set", _set, "the weight replaced (unless the strength is 0, as ComfyUI skips it)"),
)}


def patch(adapter: str, w: torch.Tensor, t: Tensors, alpha: float | None, strength: float,
          rows: Rows = None, out: int | None = None) -> torch.Tensor:
    """``w`` patched by one module of type ``adapter``: ``rows`` of the module's output that
    ``w`` holds (None: all), ``out`` the module's whole output size (``w``'s rows when None)."""
    return ADAPTERS[adapter].patch(w, t, alpha, strength, rows, w.shape[0] if out is None else out)


def patch_bias(b: torch.Tensor, diff_b: torch.Tensor, strength: float, rows: Rows = None,
               scale: float = 1.0) -> torch.Tensor:
    """A bias patched by a module's ``diff_b``: b + s scale diff_b (``scale`` 1 for a full
    difference, LyCORIS's and ComfyUI's bias_diff; alpha/r for a LoRA's ``lora_B.bias``, as
    PEFT merges it)."""
    return b + (strength * scale) * _rows(diff_b.reshape(-1), rows).reshape(b.shape)


def by_rows(adapter: str, shapes: Shapes) -> bool:
    """Whether a module of this type patches a block of rows for that block's share of the
    work (so a big weight can be patched a slice of rows at a time): LoRA, LoHa, GLoRA and
    full differences compute just those rows, and so does DoRA per output row; LoKr builds
    its whole Kronecker product, OFT's blocks and BOFT's butterflies and DoRA per input
    column need every row."""
    if adapter in ("lokr", "oft", "boft"):
        return False
    return split_problem(adapter, shapes, (0, 0)) is None


def split_problem(adapter: str, shapes: Shapes, rows: tuple[int, int]) -> str | None:
    """Why a module of this type cannot be applied to ``rows`` of its output alone (a fused
    module whose rows land on separate tensors), or None; from shapes, before any reading."""
    if adapter == "boft":
        return "BOFT mixes all rows of its layer"
    if adapter == "oft":
        size = shapes["blocks"][-1]
        if rows[0] % size or rows[1] % size:
            return f"rows {rows[0]}:{rows[1]} cut through its OFT blocks of {size}"
    dora_shape = shapes.get("dora_scale")
    if dora_shape is not None and len(dora_shape) > 1 and dora_shape[0] == 1:
        return "DoRA normalised per input column needs all rows of the layer"
    return None
