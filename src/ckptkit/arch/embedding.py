"""Textual-inversion embeddings: a few vectors in a text encoder's token space, not a model.

The formats people share, by their keys:

- ``string_to_param.<token>`` (with ``string_to_token.<token>``): the ``.pt`` of the original
  textual-inversion code and of AUTOMATIC1111 (their pickles' nested dicts, read as dotted
  names); the token is a placeholder (``*``), the trigger word is the file's name.
- ``emb_params``: the same vectors in a ``.safetensors`` file.
- ``clip_l`` and ``clip_g``: an SDXL embedding, one set of vectors per text encoder.
- one key named as a token (``<cat-toy>``): diffusers' ``learned_embeds``.

The width of the vectors names the text encoder they were trained for, and so the models
they fit: 768 is CLIP-L (SD 1.x), 1024 OpenCLIP-H (SD 2.x).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import counted

Shape = tuple[int, ...]

# width -> (the text encoder's name, its component name in ``families``, the families)
_ENCODERS = {768: ("CLIP-L", "clip_l", ["sd1"]), 1024: ("OpenCLIP-H", "openclip_h", ["sd2"])}
_SDXL = {"clip_l": 768, "clip_g": 1280}


@dataclass
class Embedding:
    format: str  # "textual-inversion", "safetensors", "sdxl" or "diffusers"
    token: str | None  # the token the file names; None where the file name is the trigger
    vectors: int
    widths: dict[str, int]  # text encoder component (clip_l...) -> width of its vectors
    families: list[str]  # the models whose text encoders it fits
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        """What identification reports under ``embedding`` (families and reasons have their
        own places there)."""
        return {"format": self.format, "token": self.token, "vectors": self.vectors,
                "widths": self.widths}


def _vectors(shape: Shape) -> tuple[int, int] | None:
    """(count, width) of a vector or a matrix of vectors; None for other shapes."""
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    return None


def detect_embedding(shapes: Mapping[str, Shape]) -> Embedding | None:
    """The embedding these keys and shapes are, or None if they are not one ckptkit knows."""
    keys = set(shapes)
    if keys == set(_SDXL):
        found = {k: _vectors(shapes[k]) for k in _SDXL}
        if any(f is None or f[1] != _SDXL[k] for k, f in found.items()):
            return None
        counts = {f[0] for f in found.values() if f}
        if len(counts) != 1:
            return None
        (count,) = counts
        return Embedding("sdxl", None, count, dict(_SDXL), ["sdxl"], [
            f"clip_l and clip_g hold {counted(count, 'vector')} each, of "
            "768 and 1280: a textual-inversion embedding for SDXL's two text encoders; "
            "its trigger word is the file's name"])
    params = {k: s for k, s in shapes.items() if k.startswith("string_to_param.")}
    tokens = {k for k in keys if k.startswith("string_to_token.")}
    if params and keys == params.keys() | tokens:
        names = [k.removeprefix("string_to_param.") for k in params]
        return _single("textual-inversion", params, names)
    if keys == {"emb_params"}:
        return _single("safetensors", shapes, [])
    (key,) = keys if len(keys) == 1 else ("",)
    if key.startswith("<") and key.endswith(">"):
        return _single("diffusers", shapes, [key])
    return None


def _single(fmt: str, shapes: Mapping[str, Shape], tokens: list[str]) -> Embedding | None:
    """Vectors for one text encoder, under one or more keys of one width; ``tokens`` are the
    tokens the keys name (a placeholder such as ``*`` in the textual-inversion format)."""
    found = [_vectors(s) for s in shapes.values()]
    widths = {f[1] for f in found if f}
    if None in found or len(widths) != 1 or next(iter(widths)) not in _ENCODERS:
        return None
    (width,) = widths
    encoder, component, families = _ENCODERS[width]
    count = sum(f[0] for f in found if f)
    token = ", ".join(tokens) or None
    trigger = (f"its token is {token}" if fmt == "diffusers"
               else "its trigger word is the file's name")
    return Embedding(fmt, token, count, {component: width}, families, [
        f"{', '.join(shapes)} hold{'s' if len(shapes) == 1 else ''} {counted(count, 'vector')}"
        f" of {width}: a textual-inversion embedding for {encoder} "
        f"({', '.join(families)}); {trigger}"])
