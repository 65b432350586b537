"""The CLIP text encoders in a diffusers folder: transformers' own files and config.json.

Why nearly nothing to rename: the canonical CLIP names are already transformers'
(``text_model.*``, ``text_projection.weight``), which is what ``text_encoder/model.safetensors``
holds, ``position_ids`` included where the file has it (transformers loads it as its buffer).
What a diffusers folder adds is the ``CLIPTextConfig``; its activation is the one thing the
weights cannot tell: OpenAI's CLIP-L uses quick GELU, the open_clip encoders (ViT-H, bigG) GELU.
The token ids are those of the official configs (bos 0, eos 2, pad 1: transformers then pools
at the highest token id, the end-of-text token of the CLIP tokenizer).
"""

from __future__ import annotations

from .diffusers_unet import refuse_unknown
from .keys import clip as clip_keys
from .keys.clip import CLIPTextConfig
from .layouts import Move

_ACTIVATION = {"clip_l": "quick_gelu", "openclip_h": "gelu", "clip_g": "gelu"}
_DEFAULT_PROJECTION = 512  # transformers' default, what configs without a projection keep


def _moves(cfg: CLIPTextConfig, present: set[str]) -> list[Move]:
    keys = clip_keys.clip_keys(cfg)
    refuse_unknown(present, set(keys), "CLIP text encoder")
    return [Move(k, (k,)) for k in keys if k in present]


def to_diffusers(cfg: CLIPTextConfig, present: set[str]) -> list[Move]:
    """Moves from the canonical keys in ``present`` to the diffusers file: the same names."""
    return _moves(cfg, present)


def from_diffusers(cfg: CLIPTextConfig, present: set[str]) -> list[Move]:
    """Moves from a diffusers text encoder file back to the canonical names: the same."""
    return _moves(cfg, present)


def diffusers_config(cfg: CLIPTextConfig, name: str) -> dict:
    """The ``text_encoder*/config.json`` of component ``name`` (clip_l, openclip_h, clip_g)."""
    projection = cfg.projection_dim
    if projection is None:  # CLIP-L's unused projection width is its own (768)
        projection = cfg.hidden if name == "clip_l" else _DEFAULT_PROJECTION
    return {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim
                          else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": _ACTIVATION[name],
        "hidden_size": cfg.hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": cfg.max_positions,
        "model_type": "clip_text_model",
        "num_attention_heads": cfg.heads,
        "num_hidden_layers": cfg.layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "vocab_size": cfg.vocab,
    }
