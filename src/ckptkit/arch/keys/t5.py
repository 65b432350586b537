"""Keys and shapes of the T5 encoder (T5-XXL v1.1, the third text encoder of SD3 and FLUX).

Why a generator: the full T5-XXL encoder is 4.8 B parameters and a tiny test copy must keep its
24 blocks and names exactly; both come from one function of a few numbers. Names are those of
transformers' ``T5EncoderModel`` as ComfyUI's ``t5xxl`` files store them (bare standalone,
under ``text_encoders.t5xxl.transformer.`` in SD3 and FLUX all-in-ones).

Stored extras that differ by file:

- ``encoder.embed_tokens.weight`` is tied to ``shared.weight`` in transformers; ComfyUI files
  keep only ``shared.weight`` (sd-mecha sd3-comfyui and flux-flux), but some files carry both
  (stable-diffusion.cpp's model.cpp lists
  ``text_encoders.t5xxl.transformer.encoder.embed_tokens.weight`` among the tensors it
  ignores), hence ``embed_tokens``.
- ComfyUI SD3 files also carry ``text_encoders.t5xxl.logit_scale`` (shape ()), outside the
  ``transformer.`` prefix; it belongs to ComfyUI's wrapper, not to T5, and is left to layouts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable


@dataclass(frozen=True)
class T5Config:
    """The numbers that decide a T5 encoder's keys and shapes."""

    d_model: int = 4096
    d_ff: int = 10240
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    vocab: int = 32128
    relative_attention_buckets: int = 32
    # Gated-GELU feed-forward (T5 v1.1: wi_0, wi_1) or the original ReLU one (wi).
    gated: bool = True
    # Also store the tied copy of the embedding, encoder.embed_tokens.weight.
    embed_tokens: bool = False

    def __post_init__(self) -> None:
        numbers = (self.d_model, self.d_ff, self.layers, self.heads, self.d_kv, self.vocab,
                   self.relative_attention_buckets)
        if min(numbers) <= 0:
            raise ValueError("T5Config: sizes must be positive")


def t5_keys(cfg: T5Config) -> KeyTable:
    """transformers ``T5EncoderModel`` names (``shared.weight``, ``encoder.*``), in order."""
    t: KeyTable = {}
    d, inner = cfg.d_model, cfg.heads * cfg.d_kv
    t["shared.weight"] = (cfg.vocab, d)
    if cfg.embed_tokens:
        t["encoder.embed_tokens.weight"] = (cfg.vocab, d)
    for i in range(cfg.layers):
        p = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            t[f"{p}.0.SelfAttention.{name}.weight"] = (inner, d)
        t[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        if i == 0:  # only the first block holds the (shared) relative position bias
            t[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (
                cfg.relative_attention_buckets, cfg.heads)
        t[f"{p}.0.layer_norm.weight"] = (d,)
        for name in ("wi_0", "wi_1") if cfg.gated else ("wi",):
            t[f"{p}.1.DenseReluDense.{name}.weight"] = (cfg.d_ff, d)
        t[f"{p}.1.DenseReluDense.wo.weight"] = (d, cfg.d_ff)
        t[f"{p}.1.layer_norm.weight"] = (d,)
    t["encoder.final_layer_norm.weight"] = (d,)
    return t


T5_XXL = T5Config()  # google/t5-v1_1-xxl encoder
T5_XXL_TINY = dataclasses.replace(T5_XXL, d_model=32, d_ff=64, heads=2, d_kv=16)
