"""Conversions of one component between its monolithic (``ldm``) and standalone (``comfyui``)
keys, as lists of moves that the engine executes tensor by tensor.

Most components only gain or lose a prefix. Two need more, both read from the family
declaration: text encoders that SD2 and SDXL store in the open_clip naming (one stacked
``in_proj`` per layer that transformers splits into ``q``/``k``/``v``, a transposed
``text_projection``, a ``logit_scale`` transformers has no place for), and the SD3/FLUX
all-in-one text encoders, whose keys sit under ``transformer.`` beside a ``logit_scale``.
Scalars that the standalone naming cannot hold are returned as "dropped" so that a split can
record them and an assemble put them back: a split then assemble is bit-identical. Older SD1
files name their CLIP-L without the ``text_model.`` level of current files; they are read under
the current names (``current_names``), as A1111 and ComfyUI load them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .families import Component
from .keys import clip as clip_keys

# open_clip -> transformers, per layer; the stacked in_proj is handled apart.
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_TOP = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
QKV = ("q", "k", "v")
# The top-level modules of transformers' CLIP text model, which older SD1 files and
# transformers 5's own state dicts store without their ``text_model.`` parent (read as if it
# were there, by detection as by the parts code).
TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")
_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


def lacks_text_model_level(keys) -> bool:
    """Whether ``keys`` (a container) are a CLIP text model's without the ``text_model.``
    level, as transformers 5 saves one: the token embedding says CLIP, where ``encoder.*``
    alone could be a VAE's or T5's."""
    return _TOKEN_EMBEDDING in keys and "text_model." + _TOKEN_EMBEDDING not in keys


@dataclass(frozen=True)
class Move:
    """One output tensor: ``target`` from ``sources`` by ``op``.

    ops: ``copy`` (one source as it is), ``rows`` (block ``index`` of ``parts`` equal row
    blocks of the one source, or of blocks of the given ``sizes`` when they differ),
    ``concat`` (sources stacked along rows), ``transpose`` (a 2-D source transposed),
    ``reshape`` (the one source with the same elements in ``shape``: a 1x1 convolution
    as a linear layer), ``swap_halves`` (the two row halves of the one source exchanged: an
    adaLN (shift, scale) that another naming stores as (scale, shift)), ``scalar`` (a 0-d
    tensor of ``value``, no source).
    """

    target: str
    sources: tuple[str, ...]
    op: str = "copy"
    index: int = 0
    parts: int = 1
    value: float = 0.0
    sizes: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()

    def row_range(self, rows: int) -> tuple[int, int]:
        """The rows of a ``rows`` move in a source of ``rows`` rows."""
        if self.sizes:
            if sum(self.sizes) != rows:
                raise ValueError(f"{self.sources[0]} has {rows} rows, not {sum(self.sizes)}")
            start = sum(self.sizes[:self.index])
            return start, start + self.sizes[self.index]
        size = rows // self.parts
        return self.index * size, (self.index + 1) * size


def _openclip_to_hf(src_prefix: str, dst_prefix: str, keys: set[str]) -> list[Move]:
    moves = []
    for key in sorted(keys):
        name = key[len(src_prefix):]
        if name in _OPENCLIP_TOP:
            moves.append(Move(dst_prefix + _OPENCLIP_TOP[name], (key,)))
        elif name == "text_projection":
            moves.append(Move(dst_prefix + "text_projection.weight", (key,), "transpose"))
        elif name.startswith("transformer.resblocks."):
            layer, _, rest = name[len("transformer.resblocks."):].partition(".")
            out = f"{dst_prefix}text_model.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight or bias
                moves.extend(Move(f"{out}self_attn.{p}_proj.{kind}", (key,), "rows", i, 3)
                             for i, p in enumerate(QKV))
                continue
            module, _, leaf = rest.rpartition(".")
            moves.append(Move(f"{out}{_OPENCLIP_LAYER[module]}.{leaf}", (key,)))
        elif name != "logit_scale":
            raise KeyError(f"no transformers name for open_clip key {name!r}")
    return moves


def _hf_to_openclip(src_prefix: str, dst_prefix: str, keys: set[str]) -> list[Move]:
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer_names = {v: k for k, v in _OPENCLIP_LAYER.items()}
    moves = []
    for key in sorted(keys):
        name = key[len(src_prefix):]
        if name in top:
            moves.append(Move(dst_prefix + top[name], (key,)))
        elif name == "text_projection.weight":
            moves.append(Move(dst_prefix + "text_projection", (key,), "transpose"))
        elif name.startswith("text_model.encoder.layers."):
            layer, _, rest = name[len("text_model.encoder.layers."):].partition(".")
            out = f"{dst_prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj",
                                                                         "v_proj"):
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    base = f"{src_prefix}text_model.encoder.layers.{layer}.self_attn."
                    moves.append(Move(f"{out}attn.in_proj_{kind}",
                                      tuple(f"{base}{p}_proj.{kind}" for p in QKV), "concat"))
                continue
            module, _, leaf = rest.rpartition(".")
            moves.append(Move(f"{out}{layer_names[module]}.{leaf}", (key,)))
        elif not name.endswith("position_ids"):
            raise KeyError(f"no open_clip name for transformers key {name!r}")
    return moves


def _inner(comp: Component) -> str:
    """The prefix of ``comp``'s canonical names inside a monolithic file (not openclip)."""
    return comp.ldm_prefix + "transformer." if comp.ldm_naming == "transformer" \
        else comp.ldm_prefix


def current_names(comp: Component, keys: Iterable[str]) -> dict[str, str]:
    """``comp``'s monolithic keys among ``keys`` -> their names in current files: the same,
    but for a transformers-named CLIP stored without the ``text_model.`` level (older SD1
    files: ``cond_stage_model.transformer.encoder.layers...``), which gains it. Loaders insert
    it when they read such files; a part or checkpoint written from them has it."""
    prefix = comp.ldm_prefix
    mine = [k for k in keys if k.startswith(prefix)]
    if comp.build is not clip_keys.clip_keys or comp.ldm_naming == "openclip":
        return {k: k for k in mine}
    inner = _inner(comp)
    return {k: inner + "text_model." + k[len(inner):]
            if k.startswith(inner) and k[len(inner):].startswith(TEXT_MODEL_CHILDREN) else k
            for k in mine}


def standalone_current_names(comp: Component, keys: Iterable[str]) -> dict[str, str]:
    """A standalone part's ``keys`` -> their names in current files: the same, but for a
    CLIP saved by transformers 5, whose ``CLIPTextModel`` has no ``text_model.`` level
    (``embeddings.*``, ``encoder.layers.*``), which gains it (identification reads such a
    file the same way)."""
    bare = comp.build is clip_keys.clip_keys and lacks_text_model_level(keys)
    return {k: "text_model." + k if bare and k.startswith(TEXT_MODEL_CHILDREN) else k
            for k in keys}


def to_canonical(comp: Component, present: set[str]) -> tuple[list[Move], dict[str, str]]:
    """Moves from ``comp``'s monolithic keys (those in ``present``) to its standalone names,
    and the keys left out (key -> name) because the standalone naming has no place for them."""
    prefix = comp.ldm_prefix
    mine = current_names(comp, present)
    dropped = {k: k[len(prefix):] for k in mine if k == prefix + "logit_scale"}
    keys = set(mine) - set(dropped)
    if comp.ldm_naming == "openclip":
        return _openclip_to_hf(prefix, "", keys), dropped
    inner = _inner(comp)
    moves = [Move(mine[k][len(inner):], (k,)) for k in sorted(keys, key=mine.__getitem__)]
    return moves, dropped


def to_ldm(comp: Component, present: set[str], scalars: dict[str, float]
           ) -> list[Move]:
    """Moves from ``comp``'s standalone keys (``present``) to its monolithic names; the
    ``scalars`` a split recorded (logit_scale) are put back where the naming has them."""
    prefix = comp.ldm_prefix
    expected = comp.keys(layout="ldm")
    if comp.ldm_naming == "openclip":
        moves = _hf_to_openclip("", prefix, present)
    else:
        inner = _inner(comp)
        moves = [Move(inner + k, (k,)) for k in sorted(present)
                 if not k.endswith("position_ids") or inner + k in expected]
    for name, value in scalars.items():
        if prefix + name in expected:
            moves.append(Move(prefix + name, (), "scalar", value=value))
    return moves
