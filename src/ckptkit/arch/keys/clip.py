"""Keys and shapes of the CLIP text encoders (CLIP-L, OpenCLIP ViT-H and ViT-bigG), in both
the Hugging Face transformers naming and the open_clip naming.

Why both: the same network is stored two ways. SD1 (``cond_stage_model.transformer.``), SDXL's
CLIP-L, SD3, FLUX and every standalone text-encoder file use the transformers names
(``text_model.encoder.layers.N.self_attn.q_proj``); the OpenCLIP encoders inside SD2
(``cond_stage_model.model.``) and SDXL base/refiner (``conditioner.embedders.{1,0}.model.``)
monolithic checkpoints keep open_clip's names, with q/k/v fused into one ``in_proj_weight``
and the projection stored transposed. One config gives both tables.

(transformers 5 made ``CLIPTextModel`` the text transformer itself: its ``save_pretrained``
writes ``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*`` without ``text_model.``,
and its loader strips that prefix from older files. ``CLIPTextModelWithProjection`` keeps it.
Our tables use the ``text_model.*`` names every checkpoint in the wild uses.)

Which optional keys real files carry differs by file, so each is a config field:

- ``position_ids`` (int64 [1, 77]): a buffer that transformers saved until it made it
  non-persistent (around 4.31). The official SD 1.5 and SDXL base checkpoints carry it; files
  saved since often do not (sd-mecha marks it optional in sd1-ldm and sdxl-sgm). Never in
  open_clip.
- ``projection_dim``: ``text_projection.weight`` [P, W] (transformers) / ``text_projection``
  [W, P] (open_clip). CLIP-G and OpenCLIP-H always have one. CLIP-L has none in SD1 and SDXL
  files and in FLUX all-in-ones (sd-mecha flux-flux: 196 keys), but has a [768, 768] one in
  ComfyUI SD3 files (sd-mecha sd3-comfyui).
- ``logit_scale`` (float, shape ()): CLIP's contrastive temperature, useless for diffusion but
  a parameter of open_clip's model, so SD2 and SDXL files carry ``<prefix>logit_scale``
  (sd-mecha marks it optional in sdxl-sgm). Only ``openclip_keys`` lists it: transformers'
  models have no such parameter. ComfyUI's text-encoder wrapper has one too, which is why
  ComfyUI SD3 files carry ``text_encoders.{clip_l,clip_g,t5xxl}.logit_scale``, at the
  encoder's root *outside* the ``transformer.`` prefix of its other keys: a property of that
  layout, for the layout to add, not a key of the encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable


@dataclass(frozen=True)
class CLIPTextConfig:
    """The numbers and stored extras that decide a CLIP text encoder's keys and shapes."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12  # no shape depends on it; kept so that the model can be built from this
    intermediate: int = 3072
    vocab: int = 49408
    max_positions: int = 77
    projection_dim: int | None = None
    position_ids: bool = False  # transformers naming only
    logit_scale: bool = False  # open_clip naming only

    def __post_init__(self) -> None:
        numbers = (self.hidden, self.layers, self.heads, self.intermediate, self.vocab,
                   self.max_positions)
        if min(numbers) <= 0 or (self.projection_dim is not None and self.projection_dim <= 0):
            raise ValueError("CLIPTextConfig: sizes must be positive")
        if self.hidden % self.heads:
            raise ValueError("CLIPTextConfig: hidden must be a multiple of heads")


def clip_keys(cfg: CLIPTextConfig) -> KeyTable:
    """transformers names (``text_model.*``, ``text_projection.weight``), ``state_dict`` order."""
    t: KeyTable = {}
    w, m = cfg.hidden, cfg.intermediate
    e = "text_model.embeddings"
    if cfg.position_ids:  # a buffer of the embeddings module: listed before its children
        t[f"{e}.position_ids"] = (1, cfg.max_positions)
    t[f"{e}.token_embedding.weight"] = (cfg.vocab, w)
    t[f"{e}.position_embedding.weight"] = (cfg.max_positions, w)
    for i in range(cfg.layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t[f"{p}.self_attn.{proj}.weight"] = (w, w)
            t[f"{p}.self_attn.{proj}.bias"] = (w,)
        t[f"{p}.layer_norm1.weight"] = (w,)
        t[f"{p}.layer_norm1.bias"] = (w,)
        t[f"{p}.mlp.fc1.weight"] = (m, w)
        t[f"{p}.mlp.fc1.bias"] = (m,)
        t[f"{p}.mlp.fc2.weight"] = (w, m)
        t[f"{p}.mlp.fc2.bias"] = (w,)
        t[f"{p}.layer_norm2.weight"] = (w,)
        t[f"{p}.layer_norm2.bias"] = (w,)
    t["text_model.final_layer_norm.weight"] = (w,)
    t["text_model.final_layer_norm.bias"] = (w,)
    if cfg.projection_dim is not None:
        t["text_projection.weight"] = (cfg.projection_dim, w)
    return t


def openclip_keys(cfg: CLIPTextConfig) -> KeyTable:
    """open_clip names as SD2/SDXL checkpoints store them (no prefix), ``state_dict`` order.

    open_clip's ``CLIP`` registers ``positional_embedding``, ``text_projection`` and
    ``logit_scale`` as its own parameters, so they come before its submodules (``transformer``,
    ``token_embedding``, ``ln_final``). ``position_ids`` does not exist in this naming.
    """
    t: KeyTable = {}
    w, m = cfg.hidden, cfg.intermediate
    t["positional_embedding"] = (cfg.max_positions, w)
    if cfg.projection_dim is not None:
        t["text_projection"] = (w, cfg.projection_dim)  # applied as x @ P: transposed
    if cfg.logit_scale:
        t["logit_scale"] = ()
    for i in range(cfg.layers):
        p = f"transformer.resblocks.{i}"
        t[f"{p}.ln_1.weight"] = (w,)
        t[f"{p}.ln_1.bias"] = (w,)
        t[f"{p}.attn.in_proj_weight"] = (3 * w, w)  # q, k, v stacked
        t[f"{p}.attn.in_proj_bias"] = (3 * w,)
        t[f"{p}.attn.out_proj.weight"] = (w, w)
        t[f"{p}.attn.out_proj.bias"] = (w,)
        t[f"{p}.ln_2.weight"] = (w,)
        t[f"{p}.ln_2.bias"] = (w,)
        t[f"{p}.mlp.c_fc.weight"] = (m, w)
        t[f"{p}.mlp.c_fc.bias"] = (m,)
        t[f"{p}.mlp.c_proj.weight"] = (w, m)
        t[f"{p}.mlp.c_proj.bias"] = (w,)
    t["token_embedding.weight"] = (cfg.vocab, w)
    t["ln_final.weight"] = (w,)
    t["ln_final.bias"] = (w,)
    return t


_replace = dataclasses.replace

# The networks: in transformers naming exactly what CLIPTextModel / CLIPTextModelWithProjection
# hold; in open_clip naming what SD2 / SDXL checkpoints store (logit_scale included).
CLIP_L = CLIPTextConfig()  # openai/clip-vit-large-patch14
OPENCLIP_H = CLIPTextConfig(hidden=1024, layers=24, heads=16, intermediate=4096,
                            projection_dim=1024, logit_scale=True)  # laion ViT-H-14
CLIP_G = CLIPTextConfig(hidden=1280, layers=32, heads=20, intermediate=5120,
                        projection_dim=1280, logit_scale=True)  # laion ViT-bigG-14

# CLIP-L as each family's checkpoints store it (see the module docstring).
CLIP_L_SD1 = _replace(CLIP_L, position_ids=True)
CLIP_L_SDXL = _replace(CLIP_L, position_ids=True)
CLIP_L_SD3 = _replace(CLIP_L, projection_dim=768)
CLIP_L_FLUX = CLIP_L

# Tiny test encoders: same layer count, vocabulary and positions, narrow widths (the MLP stays
# 4x the width). Their widths add up to the tiny UNets' context_dim (SDXL: 32 + 48).
CLIP_L_TINY = _replace(CLIP_L, hidden=32, heads=2, intermediate=128)
OPENCLIP_H_TINY = _replace(OPENCLIP_H, hidden=40, heads=2, intermediate=160, projection_dim=40)
CLIP_G_TINY = _replace(CLIP_G, hidden=48, heads=3, intermediate=192, projection_dim=48)

CLIP_L_SD1_TINY = _replace(CLIP_L_TINY, position_ids=True)
CLIP_L_SDXL_TINY = _replace(CLIP_L_TINY, position_ids=True)
CLIP_L_SD3_TINY = _replace(CLIP_L_TINY, projection_dim=32)
CLIP_L_FLUX_TINY = CLIP_L_TINY
